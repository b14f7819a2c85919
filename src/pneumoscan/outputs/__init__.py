"""Where results leave the pipeline: the one result writer (records, JSONL/CSV rows, files),
the overlay pictures for people, and the DICOM objects a PACS stores."""
