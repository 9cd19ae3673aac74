"""The app's routes, one router per concern: jobs, the DICOM node, health, the page."""
