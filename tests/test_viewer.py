"""The result page's viewer, colours and context, the model card page, and the heatmap helpers behind them."""

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from conftest import encode, make_xray_array
from model.cam import (
    HEATMAP_THRESHOLD,
    THORAX_BOX,
    heatmap_layer,
    legend_image,
    overlay_heatmap,
    thorax_box_in_pixels,
    thorax_share,
)


class ElementIndex(HTMLParser):
    """Start tags of a page with their attributes, and the text of <title>."""

    def __init__(self):
        super().__init__()
        self.elements = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title += data

    def with_role(self, role):
        """Elements marked ``data-role=role``."""
        return [(tag, attrs) for tag, attrs in self.elements if attrs.get("data-role") == role]


def parse(response):
    """An ElementIndex of a response's HTML."""
    index = ElementIndex()
    index.feed(response.get_data(as_text=True))
    return index


def post_form(client, data, filename="chest.png"):
    """POST the upload form with one file."""
    return client.post("/predict", data={"file": (io.BytesIO(data), filename)}, content_type="multipart/form-data")


def decode_data_uri(uri):
    """The PIL image inside a ``data:image/png;base64,`` URI."""
    assert uri.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))


def text_of(response):
    """A page's text with tags removed and whitespace collapsed."""
    return " ".join(re.sub(r"<[^>]+>", " ", response.get_data(as_text=True)).split())


class FixedPredictor:
    """Wraps the app's predictor and forces the winning class and the thorax share of its predictions."""

    def __init__(self, predictor, label=None, share=None):
        self._predictor, self._label, self._share = predictor, label, share

    def __getattr__(self, name):
        return getattr(self._predictor, name)

    def predict_bytes(self, data, **options):
        prediction = self._predictor.predict_bytes(data, **options)
        if self._label is not None:
            others = [name for name in prediction.probabilities if name != self._label]
            prediction.label = self._label
            prediction.probabilities = {self._label: 0.9, **{name: 0.1 / len(others) for name in others}}
        if self._share is not None:
            prediction.thorax_share = self._share
        return prediction


@pytest.fixture
def result(client, xray_png):
    """The result page for a synthetic X-ray."""
    response = post_form(client, xray_png, filename="Chest film 07.png")
    assert response.status_code == 200
    return response


# --------------------------------------------------------------------------- page structure


def test_film_heatmap_and_legend_are_separate_inline_elements(result):
    page = parse(result)
    (film_tag, film), = page.with_role("film")
    (heatmap_tag, heatmap), = page.with_role("heatmap")
    (legend_tag, _), = page.with_role("legend")
    assert film_tag == heatmap_tag == "img" and legend_tag == "figure"
    film_image, heatmap_image = decode_data_uri(film["src"]), decode_data_uri(heatmap["src"])
    assert film_image.mode == "L", "the film keeps its own grey values"
    assert heatmap_image.mode == "RGBA" and heatmap_image.size == film_image.size == (256, 256)
    alpha = np.asarray(heatmap_image)[..., 3]
    assert (alpha == 0).any() and (alpha > 0).any(), "only the strongest activations are drawn"
    sources = [attrs["src"] for tag, attrs in page.elements if tag == "img"]
    assert all(source.startswith("data:image/png;base64,") for source in sources), "images are inline, nothing stored"


def test_viewer_controls_opacity_zoom_window_level_and_toggle(result):
    page = parse(result)
    (_, opacity), = page.with_role("opacity")
    assert opacity.get("type") == "range" and opacity["min"] == "0" and opacity["max"] == "100"
    assert {"zoom-in", "zoom-out", "reset"} <= {attrs.get("data-action") for _, attrs in page.elements}
    assert page.with_role("level") and page.with_role("window"), "window/level controls"
    (_, controls), = page.with_role("controls")
    assert "hidden" in controls, "controls that need JavaScript stay hidden without it"
    toggles = {attrs.get("id"): attrs for tag, attrs in page.elements if tag == "input" and attrs.get("type") == "checkbox"}
    assert "checked" in toggles["show-heatmap"] and "checked" not in toggles["show-thorax-box"]
    (_, stage), = page.with_role("stage")
    assert stage.get("tabindex") == "0", "the viewer takes keyboard focus"
    labels = {attrs.get("for") for tag, attrs in page.elements if tag == "label"}
    assert {"show-heatmap", "show-thorax-box", "heatmap-opacity", "film-level", "film-window"} <= labels


def test_page_loads_only_self_hosted_scripts_and_no_inline_code(result):
    html = result.get_data(as_text=True)
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts, "the viewer script is linked"
    for attributes, body in scripts:
        assert body.strip() == "", "no inline script (the CSP forbids it)"
        assert re.search(r'src="/static/[a-z]+\.js"', attributes)
    assert " style=" not in html and "<style" not in html, "no inline styles (the CSP forbids them)"
    assert "http://" not in html and "https://" not in html, "nothing from another host"
    csp = result.headers["Content-Security-Policy"]
    assert "'unsafe-inline'" not in csp and "default-src 'self'" in csp


def test_legend_states_the_colour_map_and_threshold(result):
    text = text_of(result)
    assert "inferno" in text
    assert f"at least {HEATMAP_THRESHOLD * 100:.0f} % of the peak" in text
    assert f"(threshold {HEATMAP_THRESHOLD})" in text
    page = parse(result)
    legend_images = [attrs for tag, attrs in page.elements if tag == "img" and "legend-scale" in attrs.get("class", "")]
    assert decode_data_uri(legend_images[0]["src"]).size == (256, 16)


def test_thorax_share_is_stated_with_its_box(result):
    text = text_of(result)
    assert re.search(r"\d+ % of the heatmap's weight lies inside a central thorax box", text)
    assert "the middle 70 % of the width and rows 10–85 % of the height of the part of the film the model saw" in text
    (_, box), = parse(result).with_role("thorax-box")
    assert box["viewbox"] == "0 0 1000 1000"


@pytest.mark.parametrize("share, warned", [(0.3, True), (0.49, True), (0.5, False), (0.8, False)])
def test_thorax_warning_when_more_than_half_lies_outside(app, xray_png, share, warned):
    app.extensions["predictor"] = FixedPredictor(app.extensions["predictor"], share=share)
    response = post_form(app.test_client(), xray_png)
    text = text_of(response)
    assert bool(parse(response).with_role("thorax-warning")) is warned
    assert f"{round(share * 100)} % of the heatmap's weight lies inside" in text
    if warned:
        assert f"most of the heatmap ({100 - round(share * 100)} %) lies outside the chest area" in text


@pytest.mark.parametrize("label, urgency, icon, words", [
    ("NORMAL", "routine", "○", "Not an urgent class"),
    ("COVID", "urgent", "⚠", "Urgent class: review this film promptly."),
    ("PNEUMONIA", "urgent", "⚠", "Urgent class: review this film promptly."),
])
def test_class_colour_follows_meaning_with_text_and_icon(app, xray_png, label, urgency, icon, words):
    app.extensions["predictor"] = FixedPredictor(app.extensions["predictor"], label=label)
    response = post_form(app.test_client(), xray_png)
    html = response.get_data(as_text=True)
    summary = re.search(r'<div class="prediction-summary ([a-z-]+)" data-urgency="([a-z]+)">(.*?)</div>', html, re.S)
    assert summary, "the predicted class sits in a summary marked by urgency"
    assert summary.group(1) == f"is-{urgency}" and summary.group(2) == urgency
    assert re.search(rf'class="predicted-label">\s*{label}\b', summary.group(3))
    assert icon in summary.group(3) and words in summary.group(3), "never colour alone"
    assert parse(response).title.startswith(f"Result: {label}")


def test_stylesheet_gives_normal_a_neutral_colour_and_urgent_classes_a_warning_one(client):
    css = client.get("/static/style.css").get_data(as_text=True)
    variables = dict(re.findall(r"--([a-z-]+):\s*(#[0-9a-f]{6});", css))
    assert re.search(r"\.predicted-label \{[^}]*color: var\(--routine\)", css)
    assert re.search(r"\.is-urgent \.predicted-label \{ color: var\(--urgent\)", css)
    assert variables["routine"] != variables["urgent"] and variables["routine"] != variables["bar-predicted"]


def test_context_links_the_model_card_and_says_what_probabilities_mean(result):
    page = parse(result)
    assert any(attrs.get("href") == "/model-card" for tag, attrs in page.elements if tag == "a")
    (_, _), = page.with_role("probability-context")
    text = text_of(result)
    assert "On films from a new hospital they are less reliable." in text
    assert "no calibration" in text, "the tiny checkpoint has no temperature"


def test_context_names_the_calibration_when_the_checkpoint_has_one(app, xray_png):
    app.extensions["predictor"].checkpoint["temperature"] = 1.7
    text = text_of(post_form(app.test_client(), xray_png))
    assert "calibrated by temperature scaling (T = 1.70) on the validation split" in text


def test_uploaded_file_name_is_shown_but_not_logged(client, xray_png, caplog):
    caplog.set_level("DEBUG")
    response = post_form(client, xray_png, filename="Doe_Jane_1961_chest.png")
    (tag, _), = parse(response).with_role("filename")
    assert tag == "strong"
    assert "Doe_Jane_1961_chest.png" in text_of(response)
    assert "Doe_Jane" not in caplog.text


def test_long_file_names_are_shortened_and_paths_dropped(client, xray_png):
    response = post_form(client, xray_png, filename="/home/Users/x/" + "a" * 300 + ".png")
    shown = re.search(r'data-role="filename">([^<]+)<', response.get_data(as_text=True)).group(1)
    assert len(shown) == 120 and shown.endswith("…") and "Users" not in shown


def test_film_comes_before_the_prediction_in_the_page(result):
    html = result.get_data(as_text=True)
    assert html.index('data-role="film"') < html.index('id="prediction-heading"'), "the film comes first on a phone"


# --------------------------------------------------------------------------- flagged images


@pytest.fixture
def flagging_app(app):
    """The app with a predictor whose every prediction is flagged as out of distribution."""
    predictor = app.extensions["predictor"]

    class Flagging(FixedPredictor):
        def predict_bytes(self, data, **options):
            prediction = predictor.predict_bytes(data, **options)
            prediction.ood = {"flagged": True, "score": 12.0, "threshold": 5.0, "reasons": ["Unlike training films."]}
            return prediction

    app.extensions["predictor"] = Flagging(predictor)
    return app


def test_flagged_page_title_says_no_prediction_and_shows_no_class(flagging_app, xray_png):
    response = post_form(flagging_app.test_client(), xray_png)
    page = parse(response)
    assert page.title.startswith("No prediction")
    html = response.get_data(as_text=True)
    assert 'class="predicted-label"' not in html and "is-predicted" not in html and "(predicted)" not in html
    assert "data-urgency=\"urgent\">" not in html.split('<ul class="probabilities">')[0], "no urgency verdict"
    assert not page.with_role("heatmap") and not page.with_role("legend") and not page.with_role("thorax-share")
    assert page.with_role("film"), "the uploaded film is still shown, without a heatmap"
    assert "Unlike training films." in text_of(response)


# --------------------------------------------------------------------------- model card and upload form


def test_model_card_page_renders_the_markdown(client):
    response = client.get("/model-card")
    assert response.status_code == 200
    html = response.get_data(as_text=True)
    assert "<h1" in html and "Model card" in html and "<table" in html
    assert "<title>Model card · CovidScan</title>" in html
    assert " style=" not in html, "table alignment as attributes: the CSP blocks style attributes"
    assert "**" not in text_of(response), "Markdown emphasis rendered"
    figures = [attrs["src"] for tag, attrs in parse(response).elements if tag == "img"]
    assert len(figures) == 3 and all(src.startswith("/model-card/figures/") for src in figures)
    for src in figures:
        figure = client.get(src)
        assert figure.status_code == 200 and figure.mimetype == "image/png"


@pytest.mark.parametrize("name", ["../../MODEL_CARD.md", "..%2F..%2Fapp%2Fconfig.py", "roc.txt", "missing.png"])
def test_model_card_figures_serve_only_the_cards_pngs(client, name):
    assert client.get(f"/model-card/figures/{name}").status_code == 404


def test_upload_form_has_a_progress_region_and_its_script(client):
    response = client.get("/")
    page = parse(response)
    (_, progress), = page.with_role("progress")
    (_, status), = page.with_role("progress-text")
    assert "hidden" in progress, "the progress bar shows only while JavaScript reports work"
    assert status.get("role") == "status" and status.get("aria-live") == "polite"
    assert any(tag == "script" and attrs.get("src") == "/static/upload.js" for tag, attrs in page.elements)
    assert client.get("/static/upload.js").status_code == 200 and client.get("/static/viewer.js").status_code == 200


# --------------------------------------------------------------------------- heatmap helpers


def test_heatmap_layer_is_transparent_below_the_threshold():
    heat = np.tile(np.linspace(0, 1, 101, dtype=np.float32), (4, 1))
    rgba = np.asarray(heatmap_layer(heat))
    below, above = heat < HEATMAP_THRESHOLD, heat >= HEATMAP_THRESHOLD + 0.05
    assert (rgba[..., 3][below] == 0).all() and (rgba[..., 3][above] == 255).all()
    lightness = rgba[0, above[0], :3].astype(int).sum(axis=1)
    assert (np.diff(lightness) >= -2).all(), "a perceptually uniform map gets lighter towards the peak"


def test_overlay_leaves_the_film_unchanged_where_nothing_is_drawn():
    film = Image.fromarray(make_xray_array(5), mode="L")
    heat = np.zeros((256, 256), dtype=np.float32)
    heat[100:150, 100:150] = 1.0
    overlay = np.asarray(overlay_heatmap(film, heat))
    grey = np.asarray(film.convert("RGB"))
    assert (overlay[:90, :90] == grey[:90, :90]).all()
    assert not (overlay[110:140, 110:140] == grey[110:140, 110:140]).all()


def test_legend_runs_from_the_threshold_to_the_peak():
    strip = np.asarray(legend_image(width=64, height=4)).astype(int)
    layer = np.asarray(heatmap_layer(np.array([[HEATMAP_THRESHOLD, 1.0]], dtype=np.float32))).astype(int)
    assert np.abs(strip[0, 0] - layer[0, 0, :3]).max() <= 2 and np.abs(strip[0, -1] - layer[0, 1, :3]).max() <= 2


def test_thorax_box_is_the_middle_70_percent_and_rows_10_to_85_percent_of_what_the_model_saw():
    assert THORAX_BOX == (0.15, 0.10, 0.85, 0.85)
    assert thorax_box_in_pixels((200, 100)) == (30, 10, 170, 85)
    # A trimmed film: the model saw the right half only; the box lies inside that half.
    assert thorax_box_in_pixels((200, 100), content_box=(0.5, 0.0, 1.0, 1.0)) == (115, 10, 185, 85)


def test_thorax_share_counts_the_mass_inside_the_box():
    heat = np.zeros((100, 200), dtype=np.float32)
    heat[40:60, 90:110] = 1.0  # centre
    assert thorax_share(heat) == pytest.approx(1.0)
    heat[92:99, 0:20] = 1.0  # below the diaphragm, in a corner: 140 of 540 units
    assert thorax_share(heat) == pytest.approx(400 / 540)
    assert thorax_share(np.zeros((10, 10))) is None


def test_prediction_carries_film_layer_and_thorax_share(app):
    image = Image.fromarray(make_xray_array(6, size=(300, 240)), mode="L")
    prediction = app.extensions["predictor"].predict_bytes(encode(image), with_heatmap=True)
    assert prediction.film.size == prediction.heatmap_layer.size == prediction.heatmap.size == (240, 300)
    assert 0.0 <= prediction.thorax_share <= 1.0
    left, top, right, bottom = prediction.thorax_box
    assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1
    bare = app.extensions["predictor"].predict_bytes(encode(image), with_heatmap=False)
    assert bare.film is None and bare.heatmap_layer is None and bare.thorax_share is None


def test_heatmap_layer_colours_are_the_colour_maps_own():
    """The uint8 lookup table gives exactly what calling matplotlib's colour map gives, bin edges and 0 and 1 included."""
    import matplotlib

    from model.cam import HEATMAP_COLORMAP, HEATMAP_EDGE

    rng = np.random.default_rng(3)
    heat = np.concatenate([rng.random(5000, dtype=np.float32), np.arange(257, dtype=np.float32) / 256,
                           np.array([0.0, 1.0, HEATMAP_THRESHOLD, np.nextafter(1.0, 0.0)], dtype=np.float32)])[None, :]
    colours = matplotlib.colormaps[HEATMAP_COLORMAP](heat)[..., :3]
    opacity = np.clip((heat - HEATMAP_THRESHOLD) / HEATMAP_EDGE, 0.0, 1.0)
    expected = np.uint8(np.round(np.concatenate([colours, opacity[..., None]], axis=-1) * 255))
    assert np.array_equal(np.asarray(heatmap_layer(heat)), expected)
