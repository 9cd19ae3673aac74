"""DICOM reading: discover -> select -> volume."""
