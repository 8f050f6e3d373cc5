"""Fault injection for end-to-end tests: put this folder on PYTHONPATH and set

    HPDM_FAULT_SAVE=NAME     saving a safetensors file whose name ends in NAME raises OSError (a full disk)
    HPDM_FAULT_UPLOAD=NAME   uploading a file whose name ends in NAME raises StorageError (storage gone)

Python imports this module at start-up, before hpdm binds the functions it patches."""
import os

if os.environ.get("HPDM_FAULT_SAVE"):
    import safetensors.torch

    _save = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if str(filename).endswith(os.environ["HPDM_FAULT_SAVE"]):
            raise OSError(28, "No space left on device (injected)", str(filename))
        return _save(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_file

if os.environ.get("HPDM_FAULT_UPLOAD"):
    from data_pipeline import storage

    _upload = storage.Storage.upload

    def upload(self, local, url):
        if url.endswith(os.environ["HPDM_FAULT_UPLOAD"]):
            raise storage.StorageError(f"uploading {url}: access denied (injected)")
        return _upload(self, local, url)

    storage.Storage.upload = upload
