"""Fault injection for end-to-end tests: put this folder on PYTHONPATH and set

    HPDM_FAULT_SAVE=NAME     saving a safetensors file, or writing a small file (write_atomic), whose name ends in NAME
                             fails as on a full disk
    HPDM_FAULT_UPLOAD=NAME   uploading a file whose name ends in NAME raises StorageError (storage gone)
    HPDM_FAULT_SIGNAL=SIG    the process sends itself signal SIG (e.g. SIGUSR1) while training starts (preparing the data)

Python imports this module at start-up, before hpdm binds the functions it patches."""
import os

if os.environ.get("HPDM_FAULT_SAVE"):
    import errno

    import safetensors.torch

    from data_pipeline import local_files

    _save, _write_atomic = safetensors.torch.save_file, local_files.write_atomic

    def save_file(tensors, filename, *args, **kwargs):
        if str(filename).endswith(os.environ["HPDM_FAULT_SAVE"]):  # what safetensors raises on a full disk
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                              "error 28) (injected)")
        return _save(tensors, filename, *args, **kwargs)

    def write_atomic(path, data):
        if str(path).endswith(os.environ["HPDM_FAULT_SAVE"]):
            raise OSError(errno.ENOSPC, "No space left on device (injected)", str(path))
        return _write_atomic(path, data)

    safetensors.torch.save_file, local_files.write_atomic = save_file, write_atomic

if os.environ.get("HPDM_FAULT_UPLOAD"):
    from data_pipeline import storage

    _upload = storage.Storage.upload

    def upload(self, local, url):
        if url.endswith(os.environ["HPDM_FAULT_UPLOAD"]):
            raise storage.StorageError(f"uploading {url}: access denied (injected)")
        return _upload(self, local, url)

    storage.Storage.upload = upload

if os.environ.get("HPDM_FAULT_SIGNAL"):
    import signal

    import data_pipeline

    _prepare = data_pipeline.prepare_dataset

    def prepare_dataset(*args, **kwargs):
        os.kill(os.getpid(), getattr(signal, os.environ["HPDM_FAULT_SIGNAL"]))
        return _prepare(*args, **kwargs)

    data_pipeline.prepare_dataset = prepare_dataset
