"""``openvla-align cache build``: precompute a teacher's features over a dataset once (``build.py``); training then
reads them through ``targets.cache.TeacherCache``."""
