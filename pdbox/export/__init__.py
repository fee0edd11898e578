"""Export a profile to a cluster engine.

pdbox serves one box; when a team outgrows it, the same profile is carried
over to llm-d (Kubernetes-native, vLLM-based disaggregated serving) as plain
Kubernetes manifests. Nothing here talks to a cluster: the export is pure
(profile in, objects and warnings out), so it is tested offline against the
Kubernetes schemas. This package never imports torch or vllm.
"""

from pdbox.export.ledger import Export, ExportWarning, Ignored, Mapped
from pdbox.export.llmd import build

__all__ = ["Export", "ExportWarning", "Ignored", "Mapped", "build"]
