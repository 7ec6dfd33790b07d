"""The classical family: a physically based layered bokeh renderer that needs no weights."""
