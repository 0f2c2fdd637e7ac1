"""Integrations with other libraries, one module each, imported explicitly:

``gpuloss.integrations.transformers``
    Hugging Face transformers causal LMs (``pip install 'gpuloss[transformers]'``).

``import gpuloss`` imports none of them.
"""
