"""Classification metrics (scikit-learn) and evaluation plots (matplotlib, headless)."""

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score, roc_curve

ECE_BINS = 15


def softmax(logits, temperature=1.0):
    """Numerically stable softmax over the last axis of a numpy array."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exponentials = np.exp(scaled)
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def expected_calibration_error(targets, probabilities, bins=ECE_BINS):
    """Top-label expected calibration error with equal-width confidence bins."""
    targets, probabilities = np.asarray(targets), np.asarray(probabilities)
    confidences = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidences > low) & (confidences <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidences[in_bin].mean())
    return float(error)


def compute_metrics(targets, probabilities, class_names):
    """Accuracy, macro-F1, per-class sensitivity/specificity/PPV/F1/AUC, confusion matrix, ECE, n."""
    targets, probabilities = np.asarray(targets), np.asarray(probabilities)
    predictions = probabilities.argmax(axis=1)
    labels = list(range(len(class_names)))
    matrix = confusion_matrix(targets, predictions, labels=labels)
    total = matrix.sum()
    per_class = {}
    for index, name in enumerate(class_names):
        true_positive = matrix[index, index]
        false_negative = matrix[index].sum() - true_positive
        false_positive = matrix[:, index].sum() - true_positive
        true_negative = total - true_positive - false_negative - false_positive
        is_class = targets == index
        auc = float(roc_auc_score(is_class, probabilities[:, index])) if 0 < is_class.sum() < len(targets) else None
        per_class[name] = {
            "sensitivity": _ratio(true_positive, true_positive + false_negative),
            "specificity": _ratio(true_negative, true_negative + false_positive),
            "ppv": _ratio(true_positive, true_positive + false_positive),
            "f1": _ratio(2 * true_positive, 2 * true_positive + false_positive + false_negative),
            "auc": auc,
            "support": int(is_class.sum()),
        }
    return {
        "accuracy": float((predictions == targets).mean()) if len(targets) else 0.0,
        "macro_f1": float(f1_score(targets, predictions, labels=labels, average="macro", zero_division=0)),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "ece": expected_calibration_error(targets, probabilities),
        "n": int(len(targets)),
        "class_names": list(class_names),
    }


def _ratio(numerator, denominator):
    return float(numerator / denominator) if denominator else 0.0


def format_metrics_table(metrics):
    """Readable text table of a ``compute_metrics`` result."""
    lines = [
        f"n={metrics['n']}  accuracy={metrics['accuracy']:.4f}  macro_f1={metrics['macro_f1']:.4f}  ece={metrics['ece']:.4f}",
        f"{'class':<12}{'sens':>8}{'spec':>8}{'ppv':>8}{'f1':>8}{'auc':>8}{'n':>7}",
    ]
    for name, values in metrics["per_class"].items():
        auc = f"{values['auc']:.4f}" if values["auc"] is not None else "   n/a"
        lines.append(
            f"{name:<12}{values['sensitivity']:>8.4f}{values['specificity']:>8.4f}{values['ppv']:>8.4f}"
            f"{values['f1']:>8.4f}{auc:>8}{values['support']:>7}"
        )
    lines.append("confusion matrix (rows = true, columns = predicted): " + " ".join(metrics["class_names"]))
    lines.extend("  " + " ".join(f"{count:>6}" for count in row) for row in metrics["confusion_matrix"])
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_confusion_matrix(metrics, path):
    """Save the confusion matrix as a PNG."""
    pyplot = _pyplot()
    matrix, names = np.asarray(metrics["confusion_matrix"]), metrics["class_names"]
    figure, axes = pyplot.subplots(figsize=(4.5, 4))
    axes.imshow(matrix, cmap="Blues")
    for (row, column), count in np.ndenumerate(matrix):
        color = "white" if count > matrix.max() / 2 else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=color)
    axes.set(xticks=range(len(names)), yticks=range(len(names)), xticklabels=names, yticklabels=names)
    axes.set(xlabel="predicted", ylabel="true", title=f"accuracy {metrics['accuracy']:.3f}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_roc_curves(targets, probabilities, class_names, path):
    """Save one-vs-rest ROC curves as a PNG."""
    pyplot = _pyplot()
    targets, probabilities = np.asarray(targets), np.asarray(probabilities)
    figure, axes = pyplot.subplots(figsize=(4.5, 4))
    for index, name in enumerate(class_names):
        is_class = targets == index
        if 0 < is_class.sum() < len(targets):
            false_positive_rate, true_positive_rate, _ = roc_curve(is_class, probabilities[:, index])
            auc = roc_auc_score(is_class, probabilities[:, index])
            axes.plot(false_positive_rate, true_positive_rate, label=f"{name} (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC, one vs rest")
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def plot_reliability(targets, probabilities_by_name, path, bins=ECE_BINS):
    """Save a reliability diagram (accuracy against confidence) for one or more probability sets."""
    pyplot = _pyplot()
    targets = np.asarray(targets)
    figure, axes = pyplot.subplots(figsize=(4.5, 4))
    edges = np.linspace(0.0, 1.0, bins + 1)
    for name, probabilities in probabilities_by_name.items():
        probabilities = np.asarray(probabilities)
        confidences = probabilities.max(axis=1)
        correct = probabilities.argmax(axis=1) == targets
        centres, accuracies = [], []
        for low, high in zip(edges[:-1], edges[1:]):
            in_bin = (confidences > low) & (confidences <= high)
            if in_bin.any():
                centres.append(confidences[in_bin].mean())
                accuracies.append(correct[in_bin].mean())
        ece = expected_calibration_error(targets, probabilities, bins)
        axes.plot(centres, accuracies, marker="o", label=f"{name} (ECE {ece:.3f})")
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set(xlabel="confidence", ylabel="accuracy", title="reliability", xlim=(0, 1), ylim=(0, 1))
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)


def group_metrics(targets, predictions, class_names, groups, *, min_count=1):
    """Sensitivity per (true class, group): ``{"CLASS|group": {"n", "correct", "sensitivity", "predicted"}}``.

    ``groups`` gives each film's subgroup (a source, an age band...); ``predicted`` counts the answers by class, so a
    shortcut shows as where a group's misses go. Groups with fewer than ``min_count`` films are left out.
    """
    table = {}
    keys = sorted(set(zip((int(target) for target in targets), groups)), key=lambda key: (key[0], str(key[1])))
    targets, predictions, groups = np.asarray(targets), np.asarray(predictions), np.asarray(groups, dtype=object)
    for target, group in keys:
        members = (targets == target) & (groups == group)
        count = int(members.sum())
        if count < min_count:
            continue
        answers = np.bincount(predictions[members], minlength=len(class_names))
        table[f"{class_names[target]}|{group}"] = {
            "class": class_names[target], "group": group, "n": count, "correct": int(answers[target]),
            "sensitivity": _ratio(answers[target], count),
            "predicted": {name: int(answers[index]) for index, name in enumerate(class_names)},
        }
    return table


def format_group_table(table, title="group"):
    """Readable text table of a ``group_metrics`` result."""
    names = list(next(iter(table.values()))["predicted"]) if table else []
    lines = [f"{'class':<11}{title:<16}{'n':>6}{'sens':>8}  " + "".join(f"{'->' + name:>12}" for name in names)]
    for row in table.values():
        lines.append(f"{row['class']:<11}{str(row['group']):<16}{row['n']:>6}{row['sensitivity']:>8.3f}  "
                     + "".join(f"{row['predicted'][name]:>12}" for name in names))
    return "\n".join(lines)
