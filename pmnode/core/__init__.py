"""The model side, with no network: subspace math, model, stage split, codecs, the stage worker,
the single-process trainer, checkpoints and sampling."""
