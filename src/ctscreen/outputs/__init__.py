"""What ctscreen writes for the studies it scored: the DICOM answer (SR, key images, a
"not screened" report) built from the values the reader parsed, never from files read again."""
