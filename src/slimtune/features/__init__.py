"""Recipe features: one module per recipe section, each declaring what it does to a run
(:class:`slimtune.core.features.Feature`) and registering itself with ``@register_feature``.
The machinery they configure lives in the pipeline's packages (privacy/, sparsity/, compress/).
"""
