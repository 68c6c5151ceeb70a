"""Optional integrations with other libraries; each submodule imports its library (import it explicitly)."""
