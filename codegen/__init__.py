"""C generation: printing, memory planning, emission and the cffi build."""
