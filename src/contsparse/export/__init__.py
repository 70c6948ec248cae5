"""Sparse models that are smaller and faster: export formats, compressed storage, CSR inference."""

from contsparse.export.compressed import load_compressed, save_compressed
from contsparse.export.formats import FORMATS, export_run
from contsparse.export.run_model import RunModel, load_run_model
from contsparse.export.sparse import to_sparse

__all__ = ["FORMATS", "RunModel", "export_run", "load_compressed", "load_run_model", "save_compressed", "to_sparse"]
