"""scdrugmap_ray.engine: the library (data, models, pipelines, training, evaluation, explain).

Imports none of jobs/, serve/ or cli/.
"""
