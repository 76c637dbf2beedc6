"""What the notebooks use: runtime checks (runtime.py) and widgets (widgets.py, plotly and
ipywidgets, imported only when a widget is built)."""
