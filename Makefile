# The two commands: `make lab` starts JupyterLab, `make test` runs every test.
# Both set up .venv first; the set-up runs again only when its inputs change.
VENV ?= .venv
STAMP := $(VENV)/.workbench-ready

.PHONY: lab test setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-env.sh scripts/llama-cmake-args.sh \
		labextension/package.json $(wildcard labextension/src/*.ts labextension/style/*)
	VENV=$(VENV) scripts/setup-env.sh
	touch $@

# JupyterLab refuses to run as root unless told; containers and lab VMs often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG) $(LAB_ARGS)

test: setup
	scripts/browser.sh
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
