"""Physical constants and unit conversions (plain Python: importing this never loads JAX)."""

BOHR = 0.529177210903  # Angstrom per Bohr (a0), CODATA 2018.
HARTREE_TO_KCAL = 627.509474  # kcal/mol per Hartree.
EANG_TO_DEBYE = 4.80320471  # Debye per e*Angstrom.
EBOHR_TO_DEBYE = EANG_TO_DEBYE * BOHR  # 2.541746 Debye per e*Bohr.
