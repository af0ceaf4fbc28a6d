"""What the benches share: starting a service and waiting for it, loading it (wrk or Python), reading a
process's CPU, seeding domains, API keys, a real HAProxy and PostgreSQL, random models.

Each `bench/<name>.py` is a script (`python -m bench.<name>`) that imports from here and from the
project, never from another bench (an import-linter contract).
"""
