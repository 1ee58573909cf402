"""Exchange formats of labelling tools: what xal-engine writes for annotators and reads back.

    label_studio.py   Label Studio tasks (export, with pre-annotations) and its JSON export (import),
                      brush RLE and polygons
    label_studio_api  live mode: push a batch to a Label Studio server, pull its annotations
    dicom_seg         DICOM SEG objects: ROIs in (matched by SOP Instance UID), ROIs and CAMs out

Imports go down to core and store only; jobs and cli use these.
"""
