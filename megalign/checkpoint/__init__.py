"""Checkpoints: the format (format.py), saving and loading one directory (storage.py), saving from every rank
of a parallel job and reading this rank's shards at any layout (sharded.py), background saves (async_save.py),
what a checkpoint records about its model (model_record.py) and reading Hugging Face model folders
(hf_files.py). Training, convert and inference all read and write checkpoints through this package."""
