"""Quantum-chemical ESP data: molecule specs, SMILES conformers, the PySCF generator, verify.

PySCF, ASE and RDKit (the qm extra) are imported only inside the functions that need them. The
face hands on the wing's public names (and, as before the subpackages, the least-squares charge
fits and units the generator uses); the commands are `python -m dcmtune.data generate|verify`."""

from dcmtune.data.baselines import esp_design_matrix, fit_esp_charges, fit_esp_charges_shared
from dcmtune.data.file_format import provenance_path
from dcmtune.qm.conformers import (
    FUNCTIONAL_CLASSES,
    RESERVED_FILE,
    SMILES_SOURCE,
    canonical_smiles,
    check_not_reserved,
    embed,
    functional_classes,
    geometry_key,
    graph_key,
    load_smiles,
    parse_smiles,
    read_reserved,
    read_smiles_file,
    reserved_molecules,
    smiles_spec,
)
from dcmtune.qm.generator import (
    Runner,
    check_inputs,
    check_output,
    generate,
    generate_dataset,
    generated_arrays,
    molecule_records,
    process_runner,
    rebuild_command,
)
from dcmtune.qm.inputs import load_molecules
from dcmtune.qm.parts import parts_dir
from dcmtune.qm.pyscf_esp import (
    build_mol,
    check_method,
    compute_molecule,
    esp_on_grid,
    run_scf,
    scf_dipole,
)
from dcmtune.qm.specs import (
    G2_SOURCE,
    GenerationSettings,
    MoleculeSpec,
    QMError,
    SCFError,
    center_of_mass,
    check_electrons,
    make_conformers,
    molecule_seed,
)
from dcmtune.qm.verify import TOLERANCES, verify_sample
from dcmtune.units import EBOHR_TO_DEBYE

__all__ = [
    "EBOHR_TO_DEBYE",
    "esp_design_matrix",
    "fit_esp_charges",
    "fit_esp_charges_shared",
    "provenance_path",
] + [
    "FUNCTIONAL_CLASSES",
    "G2_SOURCE",
    "GenerationSettings",
    "MoleculeSpec",
    "QMError",
    "RESERVED_FILE",
    "Runner",
    "SCFError",
    "SMILES_SOURCE",
    "TOLERANCES",
    "build_mol",
    "canonical_smiles",
    "center_of_mass",
    "check_electrons",
    "check_inputs",
    "check_method",
    "check_not_reserved",
    "check_output",
    "compute_molecule",
    "embed",
    "esp_on_grid",
    "functional_classes",
    "generate",
    "generate_dataset",
    "generated_arrays",
    "geometry_key",
    "graph_key",
    "load_molecules",
    "load_smiles",
    "make_conformers",
    "molecule_records",
    "molecule_seed",
    "parse_smiles",
    "parts_dir",
    "process_runner",
    "read_reserved",
    "read_smiles_file",
    "rebuild_command",
    "reserved_molecules",
    "run_scf",
    "scf_dipole",
    "smiles_spec",
    "verify_sample",
]
