# make demo: install into .venv and run cpadgn on the bundled sample data.
# make test: install into .venv and run the test suite.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@mkdir -p out
	@echo "== 1. The exact partition of the digits generator's latent space (computed, then cached)"
	$(VENV)/bin/cpadgn partition sample_data/digits_generator.h5
	@echo "== 2. Exact-likelihood anomaly scores of held-out digits (the cache is reused)"
	$(VENV)/bin/cpadgn score sample_data/digits_generator.h5 sample_data/digits_test.csv \
		-o out/digits_scores.csv --contamination 0.05
	@echo "== 3. The wave toy, S = 1, with the noise std fitted by maximum exact likelihood"
	$(VENV)/bin/cpadgn score sample_data/wave_generator.h5 sample_data/wave.csv \
		-o out/wave_scores.csv --noise-std auto
	@echo "== 4. EM against the VAE on the same decoder, and PPCA, on exact held-out likelihood"
	$(VENV)/bin/cpadgn compare sample_data/digits_generator.h5 sample_data/digits_vae.h5 \
		--data sample_data/digits_test.csv --train sample_data/digits_train.csv --baseline ppca
	@echo "Scores written to out/digits_scores.csv and out/wave_scores.csv"

test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4

bench: $(STAMP)
	$(PY) -m pip install --quiet scikit-learn
	$(PY) benchmarks/bench_partition.py
	$(PY) benchmarks/bench_likelihood.py

clean:
	rm -rf $(VENV) out sample_data/*.partition.h5
