"""Runs: what the command line does, as a library.

:mod:`~flowmaps.runs.config` typed configs and the shipped presets (each value checked by
:mod:`~flowmaps.runs.typed`); :mod:`~flowmaps.runs.models` builds a run's network and saves and loads
models (checkpoints and exports); :mod:`~flowmaps.runs.experiment` assembles the rest of a run (data,
teacher, objective); :mod:`~flowmaps.runs.rundir`
the run directory; :mod:`~flowmaps.runs.training` trains or distils into one (``flowmaps train``,
``distill``); :mod:`~flowmaps.runs.evaluation` measures quality versus cost (vectors and images, with the
image reference statistics) and :mod:`~flowmaps.runs.evaluate` evaluates checkpoints into a run directory
(``flowmaps evaluate``); :mod:`~flowmaps.runs.plotting` draws the figures. :mod:`~flowmaps.runs.export`
loads any model path (:func:`flowmaps.load`) and exports a run's map (``flowmaps export``);
:mod:`~flowmaps.runs.devices` opens ``--device`` / ``train.device`` and torchrun's process group;
:mod:`~flowmaps.runs.extras` checks the optional extras; :mod:`~flowmaps.runs.tracking` writes the
TensorBoard sink beside ``metrics.jsonl``.

Nothing is imported here, so that reading a config does not load matplotlib."""
