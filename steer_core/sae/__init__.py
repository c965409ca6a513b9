"""SAEs: loading one (embedded, folder, registry), its labels, search by meaning, and concepts it has no feature for."""
