"""Known XSS vectors, for the sanitize tests (data only).

Each vector is a template; ``render(vector, n)`` puts in a payload that records vector ``n`` when
it runs: ``top.__xss.push(n)`` (the test page defines ``window.__xss``). Some vectors carry the
payload encoded, so the encoding itself is what a sanitizer must see through:

- ``$JS``   the payload as is: ``top.__xss.push(7)``
- ``$DEC``  every character as a decimal character reference with ``;`` (``&#116;&#111;…``)
- ``$HEX``  every character as a hex character reference without ``;`` (``&#x74&#x6f…``)
- ``$PCT``  every character percent-encoded (``%74%6f…``), for javascript: URLs
- ``$ATOB`` the payload in base64, for ``eval(atob('…'))``
- ``$B64``  ``<script>payload</script>`` in base64, for data: URLs

Sources: the OWASP XSS Filter Evasion Cheat Sheet, PortSwigger's XSS cheat sheet, the
DOMPurify and sanitize-html advisories (mutation XSS through namespace confusion and raw-text
elements), and the 0xSobky polyglot. Vectors that need a click (links, form buttons) run in the
browser test, which clicks every link and button; vectors inserted with innerHTML do not run
``<script>``, so the browser test also inserts each string as a contextual fragment, which does.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

CATEGORIES = (
    "script",
    "event-handler",
    "javascript-url",
    "svg",
    "mathml",
    "mutation",
    "entity-encoded",
    "mixed-case",
    "comment",
    "unclosed",
    "embedding",  # iframe, object, embed, base, meta, link, form, data: URLs
    "css",
    "polyglot",
)


@dataclass(frozen=True)
class Vector:
    category: str
    template: str


def render(vector: Vector, n: int) -> str:
    js = f"top.__xss.push({n})"
    out = vector.template
    out = out.replace("$DEC", "".join(f"&#{ord(c)};" for c in js))
    out = out.replace("$HEX", "".join(f"&#x{ord(c):x}" for c in js))
    out = out.replace("$PCT", "".join(f"%{ord(c):02x}" for c in js))
    out = out.replace("$ATOB", base64.b64encode(js.encode()).decode())
    out = out.replace("$B64", base64.b64encode(f"<script>{js}</script>".encode()).decode())
    return out.replace("$JS", js)


def _v(category: str, *templates: str) -> list[Vector]:
    return [Vector(category, template) for template in templates]


VECTORS: list[Vector] = [
    *_v(
        "script",
        "<script>$JS</script>",
        '<script type="text/javascript">$JS</script>',
        '<script src="data:text/javascript,$JS"></script>',
        "<script/x>$JS</script>",
        "<<script>$JS//<</script>",
        "</script><script>$JS</script>",
        "<scr<script>ipt>$JS</scr</script>ipt>",
        "<script\n>$JS</script\n>",
        '<script>/*</script><img src=x onerror="$JS">*/</script>',
        "<img \"\"\"><script>$JS</script>\">",
        "<div><script>$JS</script></div>text after",
        "<script>eval(atob('$ATOB'))</script>",
    ),
    *_v(
        "event-handler",
        "<img src=x onerror=$JS>",
        '<img src="x" onerror="$JS">',
        "<img src=x:x onerror='$JS'>",
        "<img/src/onerror=$JS>",
        "<image src=x onerror=$JS>",
        "<img\nsrc=x\nonerror=$JS>",
        "<img\tsrc=x\tonerror=$JS>",
        "<img\x0csrc=x\x0conerror=$JS>",
        '<img src=x onerror="javascript:$JS">',
        "<img src=x onerror=eval(atob('$ATOB'))>",
        "<img src=x onerror=\"eval('\\x74op.__xss.push('+this.dataset.n+')')\" data-n=0>",
        "<svg onload=$JS>",
        "<body onload=$JS>",
        "<input autofocus onfocus=$JS>",
        "<details open ontoggle=$JS>",
        "<video><source onerror=$JS></video>",
        "<audio src=x onerror=$JS>",
        "<video src=x onerror=$JS></video>",
        "<marquee onstart=$JS>x</marquee>",
        "<iframe onload=$JS></iframe>",
        "<style onload=$JS></style>",
        "<link rel=stylesheet href=x onerror=$JS>",
        "<object data=x onerror=$JS></object>",
        "<style>@keyframes xss{}</style><div style=animation-name:xss onanimationstart=$JS></div>",
        "<div onmouseover=$JS>hover me</div>",
        '<a href="#" onclick="$JS;return false">click</a>',
        "<xss autofocus tabindex=1 onfocus=$JS></xss>",
        "<frameset onload=$JS>",
        "<table background=x onerror=$JS><td>x</td></table>",
        "<img src=x onerror=alert($JS)>",
    ),
    *_v(
        "javascript-url",
        '<a href="javascript:$JS">click</a>',
        '<a href=" javascript:$JS">click</a>',
        '<a href="\x01javascript:$JS">click</a>',
        '<a href="java\tscript:$JS">click</a>',
        '<a href="java&#x09;script:$JS">click</a>',
        '<a href="jav&#x0A;ascript:$JS">click</a>',
        '<a href="javascript&colon;$JS">click</a>',
        '<a href="javascript:$PCT">click</a>',
        '<a href="javascript://%0a$JS">click</a>',
        '<iframe src="javascript:$JS"></iframe>',
        '<form action="javascript:$JS"><input type=submit value=go></form>',
        '<form><button formaction="javascript:$JS">go</button></form>',
        '<map><area href="javascript:$JS" shape=rect coords=0,0,9,9></map>',
        '<object data="javascript:$JS"></object>',
        '<embed src="javascript:$JS">',
        '<a href="vbscript:msgbox(1)">click</a>',
    ),
    *_v(
        "svg",
        "<svg><script>$JS</script></svg>",
        '<svg><script href="data:text/javascript,$JS"></script></svg>',
        "<svg/onload=$JS>",
        "<svg><animate onbegin=$JS attributeName=x dur=1s></svg>",
        "<svg><set onbegin=$JS attributeName=x to=1></svg>",
        "<svg><foreignObject><img src=x onerror=$JS></foreignObject></svg>",
        "<svg><style><img src=x onerror=$JS></style></svg>",
        "<svg><title><img src=x onerror=$JS></title></svg>",
        "<svg><desc><img src=x onerror=$JS></desc></svg>",
        '<svg><a xlink:href="javascript:$JS"><text x=9 y=9>click</text></a></svg>',
        '<svg><a><animate attributeName=href values="javascript:$JS"/><text x=9 y=9>click</text></a></svg>',
        "<svg><image href=x onerror=$JS /></svg>",
    ),
    *_v(
        "mathml",
        "<math><mtext><img src=x onerror=$JS></mtext></math>",
        "<math><style><img src=x onerror=$JS></style></math>",
        '<math><mi xlink:href="javascript:$JS">click</mi></math>',
        '<math href="javascript:$JS">click</math>',
        "<math><annotation-xml encoding=text/html><img src=x onerror=$JS></annotation-xml></math>",
    ),
    *_v(
        "mutation",
        '<noscript><p title="</noscript><img src=x onerror=$JS>"></noscript>',
        '<svg></p><style><a id="</style><img src=1 onerror=$JS>">',
        '<math><mtext><table><mglyph><style><!--</style><img title="--&gt;&lt;/mglyph&gt;&lt;img&Tab;src=1&Tab;onerror=$JS&gt;">',
        "<form><math><mtext></form><form><mglyph><style></math><img src onerror=$JS>",
        '<noembed><img title="</noembed><img src=x onerror=$JS>"></noembed>',
        '<noframes><img title="</noframes><img src=x onerror=$JS>"></noframes>',
        '<xmp><img title="</xmp><img src=x onerror=$JS>"></xmp>',
        '<iframe><img title="</iframe><img src=x onerror=$JS>"></iframe>',
        '<textarea><img title="</textarea><img src=x onerror=$JS>"></textarea>',
        '<title><img title="</title><img src=x onerror=$JS>"></title>',
        '<style><img title="</style><img src=x onerror=$JS>"></style>',
        '<template><img title="</template><img src=x onerror=$JS>"></template>',
        '<a title="&lt;img src=x onerror=$JS&gt;">x</a>',
        "<b>&lt;</b>img src=x onerror=$JS>",
        "<<b></b>img src=x onerror=$JS>",
        "<<img src=x onerror=$JS>>",
        "<svg><p><style><img src=x onerror=$JS></style></p></svg>",
        "<table><td><svg><style><img src=x onerror=$JS></style></svg></td></table>",
        "<select><template><img src=x onerror=$JS></template></select>",
        "<scr\x00ipt>$JS</scr\x00ipt><img src=x onerror\x00=1 onerror=$JS>",
    ),
    *_v(
        "entity-encoded",
        '<img src=x onerror="$DEC">',
        "<img src=x onerror=$HEX>",
        '<a href="&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;$JS">click</a>',
        '<a href="&#x6A;&#x61;&#x76;&#x61;&#x73;&#x63;&#x72;&#x69;&#x70;&#x74;&#x3A;$JS">click</a>',
        '<a href="&#0000106&#0000097&#0000118&#0000097&#0000115&#0000099&#0000114&#0000105&#0000112&#0000116&#0000058$JS">click</a>',
        '<iframe src="&#106;avascript:$JS"></iframe>',
        '<iframe srcdoc="&lt;img src=x onerror=$JS&gt;"></iframe>',
        '<iframe srcdoc="&#60;script&#62;$JS&#60;/script&#62;"></iframe>',
        "&lt;img src=x onerror=$JS&gt;<b>x</b>",
        "&#60;script&#62;$JS&#60;/script&#62;<b>x</b>",
        "&#x3C;img src=x onerror=$JS&#x3E;<i></i>",
        "&LT;img src=x onerror=$JS&GT;<i></i>",
        "&ltimg src=x onerror=$JS&gt<i></i>",
        "&amp;lt;img src=x onerror=$JS&amp;gt;<b></b>",
        "<p>&lt;iframe src=&quot;javascript:$JS&quot;&gt;</p>",
    ),
    *_v(
        "mixed-case",
        "<ScRiPt>$JS</sCrIpT>",
        "<IMG SRC=x ONERROR=$JS>",
        "<iMg sRc=x oNeRrOr=$JS>",
        '<a HREF="JaVaScRiPt:$JS">click</a>',
        "<SvG OnLoAd=$JS>",
        '<IfRaMe SrC="jAvAsCrIpT:$JS"></iFrAmE>',
        "<DETAILS OPEN ONTOGGLE=$JS>",
        "<InPuT AuToFoCuS OnFoCuS=$JS>",
    ),
    *_v(
        "comment",
        "<!--<img src=x onerror=$JS>-->",
        "<!--><img src=x onerror=$JS>-->",
        "<!---><img src=x onerror=$JS>-->",
        "<!-- --!><img src=x onerror=$JS> -->",
        "<!--[if gte IE 4]><script>$JS</script><![endif]-->",
        "<![CDATA[><img src=x onerror=$JS>]]>",
        "<svg><![CDATA[><img src=x onerror=$JS>]]></svg>",
        '<? foo="><img src=x onerror=$JS>">',
        "<!DOCTYPE html><img src=x onerror=$JS>",
        "<!--x--><img src=x onerror=$JS><!--y-->",
        "</x onmouseover=$JS><img src=x onerror=$JS>",
        "<img src=x o<!-- -->nerror=$JS>",
    ),
    *_v(
        "unclosed",
        "<img src=x onerror=$JS",
        "<img src=x onerror=$JS <b>",
        '<img src="x" onerror="$JS"',
        "<svg onload=$JS//",
        "<script>$JS",
        "<iframe src=javascript:$JS",
        '<a href="javascript:$JS">click',
        "<details open ontoggle=$JS ",
        "<input onfocus=$JS autofocus",
        "<style><img src=x onerror=$JS>",
        "<textarea><img src=x onerror=$JS>",
        "<img src=x onerror=$JS><img src=x",
        "<img src='x' onerror='$JS' <",
    ),
    *_v(
        "embedding",
        '<object data="data:text/html;base64,$B64"></object>',
        '<embed src="data:text/html;base64,$B64">',
        '<iframe src="data:text/html;base64,$B64"></iframe>',
        '<a href="data:text/html;base64,$B64">click</a>',
        '<base href="javascript:$JS//">',
        '<meta http-equiv="refresh" content="0;url=javascript:$JS">',
        '<link rel="stylesheet" href="javascript:$JS">',
        "<isindex type=image src=1 onerror=$JS>",
        "<template><script>$JS</script></template>",
        '<img src="data:image/svg+xml,<svg onload=\'$JS\'>">',
        "<portal src=javascript:$JS></portal>",
    ),
    *_v(
        "css",
        '<div style="background-image:url(javascript:$JS)">x</div>',
        '<div style="width:expression($JS)">x</div>',
        "<style>@import 'javascript:$JS';</style>",
        "<style>body{background:url(\"javascript:$JS\")}</style>",
        '<div style="x:\\65 xpression($JS)">x</div>',
    ),
    *_v(
        "polyglot",
        "jaVasCript:/*-/*`/*\\`/*'/*\"/**/(/* */oNcliCk=$JS )//%0D%0A%0d%0a//</stYle/</titLe/</teXtarEa/</scRipt/--!>\\x3csVg/<sVg/oNloAd=$JS//>\\x3e",
        '<a href="javascript:/*--></title></style></textarea></script></xmp><svg/onload=\'+/&quot;/+/onmouseover=1/+/[*/[]/+$JS//\'>">click</a>',
        "\"><img src=x onerror=$JS>",
        "'><script>$JS</script>",
        "</textarea><script>$JS</script>",
        "--></script><script>$JS</script>",
    ),
]
