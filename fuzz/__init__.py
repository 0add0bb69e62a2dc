"""portinfer's fuzz harness: every file a user hands over, mutated, must end in a load or a documented error.

    python -m fuzz --cases 100000                   # the long run (all kinds, one worker process)
    python -m fuzz --cases 600 --kinds gguf,config  # a short run of some kinds
    python -m fuzz --replay gguf:1234 --save /tmp/x # rerun one case in-process (and keep its bytes)
    python -m fuzz --atheris gguf -- -runs=20000    # coverage-guided (atheris), same mutator and oracle

Targets (targets.py) cover GGUF files, safetensors files, config.json, generation_config.json,
tokenizer.json and tokenizer_config.json (with its chat template); the mutator (mutate.py) is plain,
seeded and structure-aware; the seed corpus (seeds.py) is built from the real SmolLM2 GGUF. Cases run
in a worker process, so a crash (a signal) or a hang (no progress within --timeout-s) is recorded
against its case and the run goes on. tests/test_fuzz.py runs a seeded subset in CI.
"""
