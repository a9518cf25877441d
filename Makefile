# The two commands: `make lab` starts JupyterLab, `make test` runs every test.
# Both set up .venv first: `make lab` installs the core with the train, report, embed,
# replicas and eval extras, `make test` adds the test extra (pytest, the browser driver, ...). A stamp per
# set-up: it runs again only when its inputs change.
VENV ?= .venv
SETUP_INPUTS := pyproject.toml scripts/setup-env.sh scripts/llama-cmake-args.sh \
		labextension/package.json $(wildcard labextension/src/*.ts labextension/style/*)
LAB_STAMP := $(VENV)/.workbench-ready-lab
TEST_STAMP := $(VENV)/.workbench-ready-test

.PHONY: lab test setup clean

setup: $(LAB_STAMP)

$(LAB_STAMP): $(SETUP_INPUTS)
	VENV=$(VENV) EXTRAS=train,report,embed,replicas,eval scripts/setup-env.sh
	touch $@

$(TEST_STAMP): $(SETUP_INPUTS)
	VENV=$(VENV) EXTRAS=test scripts/setup-env.sh
	touch $@ $(LAB_STAMP)

# JupyterLab refuses to run as root unless told; containers and lab VMs often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: $(LAB_STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(ROOT_FLAG) $(LAB_ARGS)

test: $(TEST_STAMP)
	scripts/browser.sh
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
