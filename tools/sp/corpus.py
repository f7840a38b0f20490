"""Deterministic text generators for the SentencePiece fixtures.

Everything here is synthetic (no downloaded data): a Zipf-weighted pseudo-Chinese lexicon drawn from the
CJK block, a small hand-written English lexicon, code snippets, numbers and catalogue records like the item
texts `learn-kern embed` sees. `training_corpus` feeds the trainer; `test_strings` are the held-out and
adversarial strings every model is checked on.
"""

import random

ZH_WORDS = (
    "商品 价格 手机 电脑 我们 中国 北京 上海 今天 明天 时间 问题 发展 工作 生活 学习 朋友 公司 服务 质量 "
    "颜色 尺寸 包邮 正品 新款 女装 男装 运动 鞋子 衣服 裤子 耳机 充电 电池 屏幕 相机 推荐 喜欢 满意 物流 "
    "快递 收到 很好 不错 一般 便宜 优惠 活动 限时 折扣 会员 用户 数据 模型 系统 算法 推荐系统 知识 语言 "
    "大模型 文本 向量 检索 排序 召回 训练 测试 评估 结果 效果 提升 哈哈 哈哈哈 嗯嗯 好的 谢谢 你好 再见"
).split()
ZH_PUNCT = "，。！？、；：“”‘’（）《》【】…—～·"

EN_WORDS = (
    "the of and to in is for on with as by at from that this it be are was or an not have has you your we "
    "our they their new best free fast easy quality price sale buy shop order ship shipping review rating "
    "phone case cover screen battery charger cable wireless bluetooth headphones speaker laptop keyboard "
    "mouse monitor camera lens watch smart home kitchen coffee tea cup bottle water bag backpack shoe shoes "
    "running sport men women kids size color black white red blue green large small medium pack set kit "
    "model data user item recommendation embedding vector search rank learn knowledge language large train "
    "test value return function class import print string number list dict error result time date year"
).split()

CODE_WORDS = "def return if else for while in import from class self None True False print len range int str".split()
IDENTS = "x y i j k n idx value result items data user_id item_id score total count buf tmp acc".split()

USER_SYMBOLS = ["<|im_start|>", "<|im_end|>", "<|im_start|>system", "<mask>", "▁▁▁▁", "\t\t"]


class Gen:
    def __init__(self, seed):
        self.r = random.Random(seed)
        # A pseudo-Chinese lexicon: 700 characters from the CJK block, grouped into Zipf-weighted words.
        chars = self.r.sample(range(0x4E00, 0x9FA6), 700)
        self.zh_chars = [chr(c) for c in chars]
        self.zh_char_weights = [1.0 / (i + 1) for i in range(len(self.zh_chars))]
        self.zh_lex = list(ZH_WORDS)
        for _ in range(2500):
            n = self.r.choice([1, 2, 2, 2, 3, 3, 4])
            w = "".join(self.r.choices(self.zh_chars, self.zh_char_weights, k=n))
            self.zh_lex.append(w)
        self.zh_weights = [1.0 / (i + 1) ** 0.9 for i in range(len(self.zh_lex))]
        self.en_weights = [1.0 / (i + 1) ** 0.7 for i in range(len(EN_WORDS))]

    def zh_word(self):
        return self.r.choices(self.zh_lex, self.zh_weights)[0]

    def en_word(self):
        w = self.r.choices(EN_WORDS, self.en_weights)[0]
        x = self.r.random()
        if x < 0.1:
            return w.capitalize()
        if x < 0.12:
            return w.upper()
        return w

    def number(self):
        r = self.r
        kind = r.randrange(9)
        if kind == 0:
            return str(r.randrange(10 ** r.randint(1, 12)))
        if kind == 1:
            return f"{r.uniform(0, 10000):.2f}"
        if kind == 2:
            return f"{r.randint(1990, 2030)}-{r.randint(1, 12):02d}-{r.randint(1, 28):02d}"
        if kind == 3:
            return f"¥{r.randint(1, 20000)}"
        if kind == 4:
            return f"${r.randint(1, 999)}.{r.randint(0, 99):02d}"
        if kind == 5:
            return f"{r.randint(1, 100)}%"
        if kind == 6:
            return f"v{r.randint(0, 9)}.{r.randint(0, 20)}.{r.randint(0, 99)}"
        if kind == 7:
            return f"1{r.randint(3, 9)}{r.randrange(10 ** 9):09d}"
        return f"{r.randint(1, 255)}.{r.randint(0, 255)}.{r.randint(0, 255)}.{r.randint(0, 255)}"

    def zh_sentence(self):
        r = self.r
        out = []
        for _ in range(r.randint(3, 18)):
            x = r.random()
            if x < 0.08:
                out.append(self.number())
            elif x < 0.14:
                out.append(self.en_word())
            elif x < 0.28:
                out.append(r.choice(ZH_PUNCT))
            else:
                out.append(self.zh_word())
        return "".join(out) + r.choice("。！？…")

    def en_sentence(self):
        r = self.r
        words = []
        for _ in range(r.randint(3, 20)):
            x = r.random()
            if x < 0.08:
                words.append(self.number())
            elif x < 0.12:
                words.append(self.zh_word())
            else:
                words.append(self.en_word())
        s = " ".join(words)
        s = s[0].upper() + s[1:]
        return s + r.choice([".", "!", "?", "...", ",", ";", ":"])

    def code(self):
        r = self.r
        indent = r.choice(["    ", "  ", "\t", "        "])
        lines = []
        depth = 0
        for _ in range(r.randint(2, 9)):
            x = r.random()
            a, b = r.choice(IDENTS), r.choice(IDENTS)
            if x < 0.2:
                line = f"def {r.choice(EN_WORDS)}_{r.choice(EN_WORDS)}({a}, {b}={r.randint(0, 9)}):"
            elif x < 0.35:
                line = f"for {a} in range({self.number()}):"
            elif x < 0.5:
                line = f"if {a} >= {b} and not {a} == {r.randint(0, 100)}:"
            elif x < 0.65:
                line = f"{a} = {{'{b}': [{r.randint(0, 9)}, {r.randint(0, 99)}], \"k\": None}}"
            elif x < 0.8:
                line = f'print(f"{{{a}}}: {r.choice(EN_WORDS)} {self.zh_word()}")  # {r.choice(EN_WORDS)}'
            else:
                line = f"{a} += {b} * {r.randint(1, 9)}.{r.randint(0, 9)}; return {a}"
            lines.append(indent * depth + line)
            if line.endswith(":"):
                depth += 1
            elif depth and r.random() < 0.3:
                depth -= 1
        return "\n".join(lines)

    def record(self):
        r = self.r
        parts = [f"Title: {self.zh_word()}{self.zh_word()} {self.en_word()} {self.number()}"]
        if r.random() < 0.7:
            parts.append(f"Category: {self.zh_word()}/{self.zh_word()}")
        if r.random() < 0.5:
            parts.append(f"Brand: {self.en_word().upper()}")
        if r.random() < 0.6:
            parts.append(f"Price: {self.number()}")
        if r.random() < 0.5:
            parts.append("Keywords: " + ", ".join(self.zh_word() for _ in range(r.randint(1, 5))))
        return "\n".join(parts)

    def line(self):
        x = self.r.random()
        if x < 0.35:
            return self.zh_sentence()
        if x < 0.6:
            return self.en_sentence()
        if x < 0.75:
            return self.code()
        if x < 0.9:
            return self.record()
        return " ".join(self.number() for _ in range(self.r.randint(1, 6)))


def training_corpus(seed, n_lines):
    g = Gen(seed)
    lines = []
    for _ in range(n_lines):
        s = g.line()
        if g.r.random() < 0.05:
            s += g.r.choice(USER_SYMBOLS)
        # The trainer reads one sentence per line: keep code and records, with their newlines, as one line.
        lines.append(s.replace("\n", " \\n "))
    return lines


# Characters outside the training scripts: emoji (with skin tones, ZWJ sequences and flags), planes 1 and 2,
# other scripts, combining marks, invisible and control characters. Most are unknown to the models and go
# through byte fallback (or <unk>).
EXOTIC = [
    "😀", "👍🏽", "👨‍👩‍👧", "🇨🇳", "🇺🇸", "❤️", "🎉", "𠀀", "𠀁", "𪚥", "𝕏", "𝔸", "𝄞", "🀄", "🙂",
    "é", "é", "ñ", "ß", "Ω", "Ж", "ж", "ا", "ب", "अ", "क्ष", "ก", "한", "글", "日本語", "カタカナ",
    "\u00a0", "\u3000", "\u200b", "\ufeff", "\ufffd", "\ue000", "\uffff", "\x00", "\x01", "\x1f", "\x7f",
    "\u2581", "\u2581\u2581", "１２３", "ＡＢＣ", "①", "Ⅻ", "℃", "™", "©", "→", "∑", "√",
]
SPECIAL_LITERALS = ["<s>", "</s>", "<unk>", "<pad>", "<0x41>", "<0xE4>", "<|im_sta", "<|im_end", "<mask",
                    "mask>", "<|im_start|>user", "<<mask>>"] + USER_SYMBOLS


def whitespace_run(r):
    return "".join(r.choice([" ", " ", " ", "\t", "\n", "\r\n", "\u3000", "\u00a0"]) * r.randint(1, 4)
                   for _ in range(r.randint(1, 5)))


def test_strings(seed, n):
    """`n` strings covering every category, plus a few long ones (tens of thousands of characters)."""
    g = Gen(seed)
    r = g.r
    out = ["", " ", "  ", "\t", "\n", "a", "中", "1", "▁", "<s>", "</s>", "<unk>", "😀", "𠀀", "\x00"]
    out += [" " * k for k in (3, 4, 5, 7, 8, 15, 16, 17, 31, 32, 33, 40)]
    out += ["\t" * k for k in (2, 3, 4, 5)] + ["\n" * k for k in (2, 3, 4)]
    out += [c * k for c in "哈a=.-0!" for k in (2, 3, 5, 8, 13, 21)]
    while len(out) < n - 4:
        kind = r.randrange(12)
        if kind <= 2:
            s = g.line()
        elif kind == 3:
            s = g.code()
        elif kind == 4:
            s = g.record()
        elif kind == 5:  # whitespace stress: runs of spaces, tabs, newlines around words
            s = "".join(r.choice([g.en_word(), g.zh_word(), g.number(), whitespace_run(r)])
                        for _ in range(r.randint(1, 10)))
        elif kind == 6:  # exotic characters mixed into text
            s = "".join(r.choice([g.en_word(), g.zh_word(), " ", r.choice(EXOTIC), r.choice(EXOTIC)])
                        for _ in range(r.randint(1, 12)))
        elif kind == 7:  # literal special tokens, user-defined symbols and near misses
            s = "".join(r.choice([g.en_word(), g.zh_word(), " ", r.choice(SPECIAL_LITERALS)])
                        for _ in range(r.randint(1, 10)))
        elif kind == 8:  # digits
            s = "".join(r.choice([g.number(), g.number(), " ", g.zh_word(), "-", ".", ","])
                        for _ in range(r.randint(1, 8)))
        elif kind == 9:  # repeated characters and pieces
            s = "".join(r.choice(["哈", "a", "ab", "=", "-", ".", " ", "\t", "▁", g.zh_word()]) * r.randint(1, 9)
                        for _ in range(r.randint(1, 4)))
        elif kind == 10:  # random code points from assorted planes (no surrogates)
            s = "".join(chr(r.choice([r.randint(0x20, 0x7E), r.randint(0x4E00, 0x9FA5), r.randint(0xA0, 0x2FFF),
                                      r.randint(0xE000, 0xFFFF), r.randint(0x10000, 0x10FFFF), r.randint(0, 0x1F)]))
                        for _ in range(r.randint(1, 20)))
        else:  # leading / trailing whitespace around an ordinary line
            s = whitespace_run(r) + g.line() + whitespace_run(r)
        out.append(s)
    for length in (12000, 20000, 30000, 45000):
        parts, total = [], 0
        while total < length:
            p = r.choice([g.line(), g.code(), " " * r.randint(1, 40), r.choice(EXOTIC), "哈" * r.randint(1, 30)])
            parts.append(p)
            total += len(p)
        out.append("\n".join(parts))
    return out
