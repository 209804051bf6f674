"""Runs: what the command line does, as a library. :mod:`~flowmaps.runs.config` (typed configs and the
shipped presets), :mod:`~flowmaps.runs.experiment` (assemble a run; save and load models),
:mod:`~flowmaps.runs.evaluation` and :mod:`~flowmaps.runs.image_evaluation` (quality versus cost; image
reference statistics) and :mod:`~flowmaps.runs.plotting` (figures).

Nothing is imported here, so that reading a config does not load matplotlib."""
