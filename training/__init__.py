"""RvR training on the engine's model, and the synthetic compositional world it is run on.

World and data (no model dependency):
    world.py      scenes of coloured shapes and their renderer
    prompts.py    prompt specs over 1-5 dimensions, scene sampling (aligned / violating), held-out split
    checker.py    pixel-only alignment checker and its validation (`python -m training.checker`)
    dataset.py    paper-style dataset construction, record readers/writers (parquet, JSONL)
    editing.py    edit pairs (attributes fixed in place) and the checker-derived edit instruction

Training (docs/training.md §1):
    packing.py    samples as splits, packed with BAGEL's training mask
    forward.py    dense-mask SDPA forward of `Bagel`, MSE velocity + CE losses
    samples.py    records -> samples (rvr / t2i / und / edit) and the data mixture
    trainer.py    AdamW, warm-up, clipping, EMA, resumable engine-format checkpoints
    autoencoder.py  small FLUX-architecture autoencoder training
    runs.py       the staged run from one command (`python -m training.runs`)
    evaluate.py   mini-GenEval on held-out prompts (RvR, re-roll and editing baselines)
"""
