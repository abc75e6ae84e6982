"""The project's report (`kn report PROJECT --out DIR`, the app's File > Export > Report): report.json,
report.md and a self-contained report.html with the runs' figures, built from a project without Qt or a model.

`document` reads a project into plain data (or the app builds the same from its session; light to import, the
app's project files read their setting names from it), `build` turns it into the report's data and Markdown,
`figures` draws with matplotlib, `write` writes the folder all or nothing (`write_report`).
"""
