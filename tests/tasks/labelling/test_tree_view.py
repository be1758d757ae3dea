from tasks.labelling.tree_view import LeafView, leaf_text, tree_html

LEAF = LeafView(token_texts=["1", "+", "2", "=", "3", "\n"], entropies=[0.1, 0.2, 1.5, 0.1, 2.0, 0.0],
                boundaries=[0, 2, 4], branch_at=0, depth=0, final_correct=True)
CHILD = LeafView(token_texts=["1", "+", "2", "=", "4"], entropies=[0.1, 0.2, 1.5, 0.1, 2.0],
                 boundaries=[0, 2, 4], branch_at=5, depth=1, final_correct=False)


def test_leaf_text_marks_cuts_and_anchors():
    text = leaf_text(LEAF, tau=1.0)
    assert text.plain == "✓ 1+│2=│3⏎"
    anchored = {text.plain[span.start:span.end] for span in text.spans if "on red" in str(span.style)}
    assert anchored == {"2", "3"}


def test_tree_html_escapes_and_dims_shared_prefix():
    page = tree_html("What is <1+2>?", [LEAF, CHILD], tau=1.0)
    assert "What is &lt;1+2&gt;?" in page
    assert page.count('class="cut"') == 4 + 1  # two cuts per leaf, plus the legend
    assert page.count('class="anchor"') == 2  # root leaf: two tokens at or above tau, not shared
    assert page.count('class="anchor shared"') == 2  # child: the same anchors sit in its shared prefix
    assert "margin-left:2em" in page and "H=2.000 nats" in page
