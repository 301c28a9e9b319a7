"""Data: vocabularies, objectives (preprocessors), built-in offline corpora and the pipeline
from a seqio task or mixture to sharded global batches."""
