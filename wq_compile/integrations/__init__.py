"""Where WindowQuant meets a model library: the transformers cache and attention function, the window locators per
VLM family, and the tiny random-weight model builders the tests and examples use.

May import: ``runtime``, ``compiler``, ``kernels``, ``core``. Not ``tuning`` or ``tools``.
"""
