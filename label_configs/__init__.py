"""Labeling configs, one per kind of human feedback: pairwise, ranking, rating,
demonstration and critique. `load(name)` returns the XML."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).parent
NAMES = tuple(sorted(p.stem for p in FOLDER.glob("*.xml")))


def load(name: str) -> str:
    """The XML of a config by name ('pairwise') or a path to an XML file of one's own."""
    path = Path(name)
    if path.suffix == ".xml" and path.is_file():
        return path.read_text()
    if name not in NAMES:
        raise ValueError(
            f"no label config {name!r}; choose one of {', '.join(NAMES)} or pass an .xml file"
        )
    return (FOLDER / f"{name}.xml").read_text()
