"""What the notebooks use: runtime checks and the one model/tokenizer load of a notebook
(runtime.py), figures and live views (widgets.py, with static SVG pictures from svg.py), the
token timeline of notebook 07 (timeline.py) and exercise checks (exercises.py). plotly and
ipywidgets are imported only when a figure or widget is built."""
