# fairforget: `make demo` runs the main job, `make test` the test suite. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= runs/demo

.PHONY: demo test bench headline lint clean mutation docs

$(VENV)/.installed: pyproject.toml examples/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]" -e examples
	touch $@

demo: $(VENV)/.installed  ## train a 4-shard SISA ensemble on Biased-Digits via Flower, forget 3 samples, then EnD beside it
	$(BIN)/fairforget simulate --out $(OUT) --force
	$(BIN)/fairforget forget --run $(OUT) --ids 17,42,5
	$(BIN)/fairforget simulate --out $(OUT)-end --force --quiet --set objective=end \
		--set audit-attacks=loss,confidence,entropy --set audit-references=0
	$(BIN)/fairforget compare $(OUT) $(OUT)-end --out $(OUT)/vanilla_vs_end
	@echo "report: $(OUT)/report.md"
	@echo "biased (vanilla) vs debiased (EnD), utility and leakage: $(OUT)/vanilla_vs_end.md"

test: $(VENV)/.installed  ## unit tests + end-to-end Flower runs, on 2 workers (the Flower runs one after another)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(VENV)/.installed  ## unlearning speed-ups and Flower engine overhead (prints figures)
	$(BIN)/python simulations/benchmark.py
	$(BIN)/python simulations/diffusion_bench.py

headline: $(VENV)/.installed  ## vanilla vs augmented vs augmented + step-wise unlearning (two variants, ~20 min)
	$(BIN)/python simulations/augment_headline.py

# mutation testing (not part of `make test`; hours on 2 cores for every mutant): mutmut mutates
# fairforget/privacy/, audit/, sisa.py, ledger.py, tombstones.py and verify.py in a copy (mutants/; the source
# tree is never changed) and runs, per mutant, the fast tests of [tool.mutmut] that cover it; then prints the
# kill rate per module. MUTANTS limits the run, e.g. make mutation MUTANTS='fairforget.audit.*'.
# MUTATION_SAMPLE=N runs instead a uniform random sample of N mutants of each file (seed MUTATION_SEED;
# MUTATION_FILES limits the files, e.g. MUTATION_FILES=fairforget/sisa.py) and prints each file's sampled
# kill rate with its 95% Clopper-Pearson interval
MUTANTS ?=
MUTATION_SAMPLE ?=
MUTATION_SEED ?= 28
MUTATION_FILES ?=
mutation: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[dev,mutation]"
ifeq ($(MUTATION_SAMPLE),)
	$(BIN)/mutmut run --max-children 2 $(MUTANTS)
	$(BIN)/python simulations/mutation_report.py --survivors 20
else
	$(BIN)/python simulations/mutation_sample.py --sample $(MUTATION_SAMPLE) --seed $(MUTATION_SEED) --max-children 2 $(MUTATION_FILES)
	$(BIN)/python simulations/mutation_report.py --sampled --survivors 20
endif

# the docs site into site/ (warnings are errors); then the results pages whose code changed since their figures
docs: $(VENV)/.installed
	@if [ -f docs/gen_reference.py ]; then $(BIN)/python docs/gen_reference.py; fi
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site
	@$(BIN)/python docs/stale_results.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .

clean:
	rm -rf runs
