"""The project's two images (hack/images.py), built once and imported into a real node.

``built_images(node)`` builds the operator and the CPU trainer image (a cached archive
costs nothing), imports both into the node's containerd once per node, and returns their
references, which are the Helm chart's defaults (the trainer with its `-cpu` tag)."""

from __future__ import annotations

from typing import Any

from tests.support.cluster import load_hack_script

images = load_hack_script("images.py")
VARIANT = "cpu"
_imported: dict[str, dict[str, str]] = {}


def built_images(node: Any) -> dict[str, str]:
    """{"operator": ref, "trainer": ref}, present on the node."""
    if node.name not in _imported:
        archives = images.build(("operator", "trainer"), VARIANT)
        for archive in archives.values():
            node.import_image(archive)
        _imported[node.name] = {which: images.image_ref(which, VARIANT) for which in archives}
    return _imported[node.name]
