"""Integrations with other libraries. Each submodule imports its library itself, on import of that
submodule only, so none of them is a dependency of flashattn:

    import flashattn.integrations.transformers    # Hugging Face transformers (pip install flashattn[transformers])
"""
