"""jupyter_server's pytest fixtures (a real server in the test's event loop), for the
tests in this folder only: their autouse fixtures manage event loops and server
instances that the rest of the suite does not want."""

from pytest_jupyter.jupyter_core import *  # noqa: F401,F403
from pytest_jupyter.jupyter_server import *  # noqa: F401,F403
