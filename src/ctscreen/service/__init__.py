"""``ctscreen serve``: the screening service (job store, scoring worker, HTTP API, web page).

:mod:`.store` (the persistent job store) and :mod:`.worker` (the scoring child
process and its watchdog) import no web framework, so other front ends (a DICOM
node) can reuse them; :mod:`.app` is the FastAPI layer and needs the ``serve`` extra.
"""
