"""The train job: symmetric-pair DCFM training on Ray Train (DDP), checkpoints in object storage, resume.

``dcfm.train.config.TrainJobConfig`` describes a run, ``dcfm.train.job.run_train_job`` runs (or resumes) it,
``dcfm.train.cli`` is `dcfm train` and `jobs/train.py`. Nothing heavy is imported here, so `dcfm --help`
stays fast.
"""
