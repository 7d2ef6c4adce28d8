"""An HTML template for `dvc plots show` that renders without network.

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline it
is blank. This template inlines the three libraries (bundled by
vl-convert-python) and leaves out DVC's ``{scripts}`` placeholder, where the
CDN tags would go; ``.dvc/config`` points ``plots.html_template`` at it.
"""

from __future__ import annotations

from pathlib import Path

from triage.io import atomic_write_text

TEMPLATE_PATH = Path(".dvc/plots/offline.html")

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>DVC plots</title>
{refresh_tag}
<!-- Vega VEGA_VERSION, Vega-Lite, Vega-Embed EMBED_VERSION: inlined by vl-convert-python, so no network is needed -->
<script type="text/javascript">
BUNDLE
</script>
<style>
body { font-family: sans-serif; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def html_template() -> str:
    import vl_convert

    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")  # a literal would end the tag
    page = PAGE.replace("VEGA_VERSION", vl_convert.get_vega_version())
    return page.replace("EMBED_VERSION", vl_convert.get_vega_embed_version()).replace("BUNDLE", bundle, 1)


def write_html_template(path: Path = TEMPLATE_PATH) -> Path:
    atomic_write_text(path, html_template())
    return path
