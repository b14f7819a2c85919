"""The fixed output order of every PneumoScan classifier (SPEC, "Label order")."""

LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "No Finding",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)

NO_FINDING = "No Finding"

#: The 14 ChestX-ray14 findings, i.e. every label except "No Finding".
FINDINGS: tuple[str, ...] = tuple(label for label in LABELS if label != NO_FINDING)
