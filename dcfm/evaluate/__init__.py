"""The evaluate job: mIoU, wIoU, per-class IoU, VC8/VC16, ms per keyframe and non-keyframe, FPS of a checkpoint
on labelled clips (synth, VSPW, Cityscapes sequences, CamVid), as JSON, Markdown and an accuracy-vs-speed PNG.

``dcfm.evaluate.config.EvaluateJobConfig`` describes a run, ``dcfm.evaluate.job.run_evaluate_job`` runs it,
``dcfm.evaluate.cli`` is `dcfm evaluate` and `jobs/evaluate.py`.
"""
