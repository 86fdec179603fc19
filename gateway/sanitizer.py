"""HTML sanitizer engines behind one small seam: nh3 (default) and bleach.

nh3 binds ammonia, the maintained Rust sanitizer; bleach 6.4.0's own release notes say it is no
longer maintained and will have no further releases, not even for security fixes, so it is
kept for users who want its exact behaviour (including ``escape``: markup turned into visible
text instead of dropped), not as the default.

What a string becomes (``Cleaner.clean``):

- A string without ``<`` cannot contain an element, attribute or comment for an HTML parser, so
  with ``output: text`` it is returned as it is without calling the engine (the hot path: most
  JSON strings); with HTML output only when it holds no ``&`` or ``>`` either (``unchanged``).
- Otherwise the engine removes every element not allowed (none by default), every attribute
  not allowed, URLs with schemes not allowed, comments, and the contents of script, style and
  similar elements (removed, not turned into text).
- ``output: text`` (default, for JSON APIs): the result is plain text again. Entities the engine
  wrote are decoded, so ``Tom & Jerry`` stays ``Tom & Jerry`` and ``a < b`` stays ``a < b``; a
  ``<`` that would open a tag once decoded (``&lt;b&gt;`` written by the client as text, say) is
  written ``&lt;``, so the value still parses as text only. ``output: html``: the engine's HTML is
  kept as is (``Tom &amp; Jerry``), for upstreams that insert values into HTML unescaped. Fields
  with ``allowed_tags`` always get HTML: their markup is the point.
"""

from __future__ import annotations

import html
import re
from typing import Any, Literal

Engine = Literal["nh3", "bleach"]
# Elements whose content is code or data, never text to show (removed with the element).
CONTENT_DROPPED = frozenset({"script", "style", "template", "noscript", "iframe", "noembed", "noframes", "xmp", "plaintext", "title", "textarea", "math", "svg"})
# After decoding, a "<" followed by one of these would start a tag, end tag, comment or
# processing instruction (WHATWG HTML, tokenization: tag open state).
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")


class Cleaner:
    """One route's (or one field's) sanitizing rules, built once."""

    def __init__(
        self,
        engine: Engine = "nh3",
        tags: frozenset[str] = frozenset(),
        attributes: dict[str, frozenset[str]] | None = None,
        protocols: frozenset[str] = frozenset({"http", "https", "mailto"}),
        output: Literal["text", "html"] = "text",
        escape: bool = False,
    ) -> None:
        self.engine = engine
        self.tags = tags
        self.attributes = attributes or {}
        self.protocols = protocols
        self.html_out = output == "html" or bool(tags) or escape
        self.escape = escape
        if engine == "nh3":
            import nh3

            # One ammonia builder for the route, made here: nh3.clean() built one per string.
            self._clean = nh3.Cleaner(
                tags=set(tags),
                clean_content_tags=set(CONTENT_DROPPED - tags),
                # ammonia keeps lang and title on every allowed tag unless "*" says otherwise;
                # only the configured attributes are kept (as with bleach).
                attributes={"*": set(), **{tag: set(names) for tag, names in self.attributes.items()}},
                url_schemes=set(protocols),
                strip_comments=True,
                link_rel=None,
            ).clean
        else:
            import bleach  # only when chosen
            from bleach.sanitizer import Cleaner as BleachCleaner

            self._bleach_cleaner = BleachCleaner(
                tags=set(tags),
                attributes={tag: list(names) for tag, names in self.attributes.items()},
                protocols=set(protocols),
                strip=not escape,
                strip_comments=True,
            )
            self._bleach_module = bleach
            self._clean = self._bleach

    def clean(self, value: str) -> str:
        if self.unchanged(value):
            return value
        cleaned = self._clean(value)
        if self.html_out:
            return cleaned
        return _TAG_OPEN.sub("&lt;", html.unescape(cleaned))

    def unchanged(self, value: str) -> bool:
        """Whether ``clean`` returns the value as it is, without asking the engine (the hot path).

        Without ``<`` there is no element, attribute or comment, so text output is the value
        itself; HTML output still writes ``&`` and ``>`` as ``&amp;`` and ``&gt;`` (``Tom & Jerry``
        → ``Tom &amp; Jerry``), so those strings go through the engine too.
        """
        if "<" in value:
            return False
        return not self.html_out or ("&" not in value and ">" not in value)

    def has_markup(self, value: str) -> bool:
        """Whether cleaning would change the value's meaning (for mode: reject)."""
        if "<" not in value:
            return False
        return self.clean(value) != value

    def _bleach(self, value: str) -> str:
        if not self.escape:
            value = _drop_content(value, CONTENT_DROPPED - self.tags)
        return self._bleach_cleaner.clean(value)


def _drop_content(value: str, elements: frozenset[str]) -> str:
    """Remove whole elements (tag and content) with an HTML5 parser, as browsers would parse them.

    bleach strips a disallowed tag but keeps its content as text (``alert(1)`` from a script);
    nh3 drops such content itself. Parsing with html5lib (bleach's own parser) keeps this
    faithful to how a browser splits the markup.
    """
    from bleach._vendor import html5lib  # type: ignore[attr-defined]
    from bleach._vendor.html5lib.serializer import HTMLSerializer  # type: ignore[import-not-found]

    fragment = html5lib.parseFragment(value, treebuilder="etree", namespaceHTMLElements=False)
    _prune(fragment, elements)
    walker = html5lib.getTreeWalker("etree")
    serializer = HTMLSerializer(quote_attr_values="always", omit_optional_tags=False, resolve_entities=False, alphabetical_attributes=False)
    return "".join(serializer.serialize(walker(fragment)))


def _prune(node: Any, elements: frozenset[str]) -> None:
    for child in list(node):
        tag = child.tag.rsplit("}", 1)[-1].lower() if isinstance(child.tag, str) else ""
        if tag in elements:
            tail = child.tail
            index = list(node).index(child)
            node.remove(child)
            if tail:  # the text after the element belongs to the parent
                if index > 0:
                    previous = list(node)[index - 1]
                    previous.tail = (previous.tail or "") + tail
                else:
                    node.text = (node.text or "") + tail
        else:
            _prune(child, elements)
