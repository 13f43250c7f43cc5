"""Model-independent core: the adapter contract, the session, the scoring math and the result object.

Nothing here imports the rest of the package (adapters, front ends, pictures, files, model loading).
"""
