"""Object names and labels shared by every manifest of one export."""

from __future__ import annotations

import re
from dataclasses import dataclass


def dns_label(text: str) -> str:
    """A DNS-1123 label: lower case, digits and '-', at most 63 characters."""
    out = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return out[:63].rstrip("-") or "pdbox"


@dataclass(frozen=True)
class Names:
    profile: str
    namespace: str

    @property
    def base(self) -> str:
        # Leave room for "-aggregated" (11) and "-epp" suffixes.
        return dns_label(f"pdbox-{self.profile}")[:50].rstrip("-")

    def role(self, role: str) -> str:
        return f"{self.base}-{role}"

    @property
    def pool(self) -> str:
        return self.base

    @property
    def epp(self) -> str:
        return f"{self.base}-epp"

    @property
    def epp_config(self) -> str:
        return f"{self.base}-epp-config"

    def common_labels(self) -> dict[str, str]:
        return {
            "app.kubernetes.io/name": "pdbox",
            "app.kubernetes.io/instance": self.base,
            "app.kubernetes.io/managed-by": "pdbox-export",
        }

    def pool_labels(self) -> dict[str, str]:
        """What the InferencePool selects: every model-server pod of this export."""
        return {"app.kubernetes.io/instance": self.base, "llm-d.ai/inference-serving": "true"}

    def meta(self, name: str, component: str) -> dict[str, object]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": {**self.common_labels(), "app.kubernetes.io/component": component},
        }
