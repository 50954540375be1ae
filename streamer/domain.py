"""Domain constants every package shares: depth classes, species codes, the paper's dose and the
pixel/Å conversion. They live in the lowest layer because the wire protocol and the session file
carry these codes; this module imports nothing, so any package may import it."""

from __future__ import annotations

#: deepest atomic column, atoms along the beam (depth classes 0..MAX_ATOMS).
MAX_ATOMS = 10
#: number of depth classes (0..10 atoms): the network's depth head, the temporal model's states.
N_DEPTHS = MAX_ATOMS + 1

#: species codes of species maps and column tables (0 is background).
SPECIES_BACKGROUND, SPECIES_CE, SPECIES_O = 0, 1, 2
#: number of species classes (background, Ce, O): the network's species head.
N_SPECIES_CLASSES = 3
#: element symbol -> species code, and back.
SPECIES_CODE = {"Ce": SPECIES_CE, "O": SPECIES_O}
SPECIES_NAME = {code: name for name, code in SPECIES_CODE.items()}

#: the paper's dose λ: mean counts of a vacuum pixel per frame (e-/px), the training noise level.
PAPER_DOSE_E_PER_PX = 2.5

#: relative pixel-size mismatch (input vs training) beyond which a warning is given.
PIXEL_SIZE_TOLERANCE = 0.1

PM_PER_ANGSTROM = 100.0


def px_per_angstrom(pixel_size_pm: float) -> float:
    """Pixels per Å at a pixel size in pm."""
    return PM_PER_ANGSTROM / pixel_size_pm


def pixel_size_mismatch(pixel_size_pm: float, reference_pm: float) -> bool:
    """True where ``pixel_size_pm`` differs from ``reference_pm`` by more than
    :data:`PIXEL_SIZE_TOLERANCE` (relative)."""
    return abs(pixel_size_pm / reference_pm - 1.0) > PIXEL_SIZE_TOLERANCE
