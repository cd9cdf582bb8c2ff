"""FX node provenance kept without copying it: the same history, a fraction of the conversion time.

torch 2.14's `torch.fx.traceback.NodeSource(node)` deep-copies the node's whole `from_node` history, and every FX
pass makes a NodeSource for every node it touches. The history grows by one level per pass, so a lowering that runs
hundreds of passes (ExecuTorch's edge and XNNPACK passes over each delegate, litert-torch's decompositions) spends
a quadratic amount of time copying it: about a fifth of the time of a default-model bundle, in `copy.deepcopy`.

Nothing mutates a recorded NodeSource (passes replace a node's `from_node` list or append to the node's own list,
never to a NodeSource's), so sharing the older entries instead of copying them records the same provenance: the
same debug handles (ExecuTorch derives them from each node's oldest ancestor) and the same bytes out.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator


@contextmanager
def shared_provenance() -> Iterator[None]:
    from torch.fx.traceback import NodeSource

    copying_init = NodeSource.__init__

    def sharing_init(self, node=None, pass_name: str = "", action=None) -> None:
        history = node.meta.get("from_node") if node is not None else None
        if history is None:
            return copying_init(self, node, pass_name, action)
        del node.meta["from_node"]  # the original would deep-copy it
        try:
            copying_init(self, node, pass_name, action)
        finally:
            node.meta["from_node"] = history
        self.from_node = list(history)

    NodeSource.__init__ = sharing_init
    try:
        yield
    finally:
        NodeSource.__init__ = copying_init
