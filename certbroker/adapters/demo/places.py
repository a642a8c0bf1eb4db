"""Where the synthetic citizens live, and what they are called (data for
certbroker.adapters.demo.population).

Seven real counties/districts whose service halls appear in the project's news seeds; town and
street names are real or plausible for each, employers are fictional.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Place:
    """A county/district whose service hall appears in the news seeds."""

    area: str  # administrative area code, the first six digits of a resident ID
    province: str
    city: str  # "" for a municipality (北京市)
    county: str
    abbr: str  # province abbreviation on property certificates
    police: str  # public security bureau issuing household registration
    pension_yuan: int  # typical monthly pension here
    minorities: tuple[tuple[str, float], ...]  # (ethnicity, share) besides 汉族
    towns: tuple[tuple[str, tuple[str, ...]], ...]  # (街道/镇, streets, communities or villages)

    @property
    def prefix(self) -> str:
        return self.province + self.city + self.county

    @property
    def local(self) -> str:
        """How local offices are named: 龙游县, 广州市海珠区, 北京市西城区."""
        if self.county.endswith("区"):
            return self.insured_city + self.county
        return self.county

    @property
    def insured_city(self) -> str:
        return self.city or self.province


PLACES = (
    Place("330825", "浙江省", "衢州市", "龙游县", "浙", "龙游县公安局", 3300, (("畲族", 0.01),),
          (("龙洲街道", ("荣昌路", "龙洲路", "太平东路")), ("东华街道", ("东华大道", "翠光岩路")),
           ("湖镇镇", ("湖镇村", "星火村")), ("溪口镇", ("溪口村", "灵山村")))),
    Place("510812", "四川省", "广元市", "朝天区", "川", "广元市公安局朝天区分局", 2500,
          (("回族", 0.005),),
          (("朝天镇", ("嘉陵路", "明月峡路")), ("羊木镇", ("羊木村", "新华村")),
           ("中子镇", ("中子村", "石门村")))),
    Place("110102", "北京市", "", "西城区", "京", "北京市公安局西城分局", 5000,
          (("满族", 0.02), ("回族", 0.02)),
          (("新街口街道", ("西直门内大街", "新街口北大街", "赵登禹路")),
           ("月坛街道", ("月坛北街", "三里河路", "南礼士路")),
           ("展览路街道", ("阜成门外大街", "车公庄大街")),
           ("德胜街道", ("德胜门外大街", "新康街")))),
    Place("410502", "河南省", "安阳市", "文峰区", "豫", "安阳市公安局文峰分局", 2600,
          (("回族", 0.01),),
          (("东大街街道", ("东大街", "仓巷街")), ("光华路街道", ("光华路", "中华路")),
           ("紫薇大道街道", ("紫薇大道", "文峰大道")))),
    Place("440105", "广东省", "广州市", "海珠区", "粤", "广州市公安局海珠区分局", 4300,
          (("壮族", 0.01),),
          (("琶洲街道", ("新港东路", "琶洲大道")), ("江南中街道", ("江南大道中", "江南西路")),
           ("昌岗街道", ("昌岗中路", "宝岗大道")), ("滨江街道", ("滨江东路", "滨江中路")))),
    Place("150302", "内蒙古自治区", "乌海市", "海勃湾区", "蒙", "乌海市公安局海勃湾区分局", 3400,
          (("蒙古族", 0.05), ("回族", 0.02), ("满族", 0.01)),
          (("新华街道", ("人民路", "黄河东街", "云泉小区")), ("滨河街道", ("滨河大道", "海拉路")),
           ("千里山镇", ("团结路", "千钢小区")))),
    Place("640106", "宁夏回族自治区", "银川市", "金凤区", "宁", "银川市公安局金凤区分局", 3200,
          (("回族", 0.2),),
          (("良田镇", ("和顺新村", "植物园村")), ("满城北街街道", ("满城北街", "北京中路")),
           ("黄河东路街道", ("黄河东路", "宁安大街")), ("长城中路街道", ("长城中路", "正源北街")))),
)  # fmt: skip
PLACE_WEIGHTS = (12, 8, 16, 14, 20, 10, 12)

# Common surnames, most common first (weights fall off like real frequencies); one compound.
SURNAMES = list(
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈"
)
SURNAMES.append("欧阳")
SURNAME_WEIGHTS = [1 / (rank + 4) for rank in range(len(SURNAMES))]
# Given-name characters by generation: (born before 1970, 1970-1999) x (male, female).
GIVEN_OLD = ("国建华明军文志德永平海强福光荣庆林生", "秀英桂兰玉珍凤琴芳淑华翠梅莲素霞云")
GIVEN_MID = ("伟磊强勇军杰涛斌超鹏辉刚健波飞峰亮浩宁俊", "丽静敏燕娟艳娜婷霞琳慧倩雪颖洁莉萍玲")
GIVEN_NEW = (
    ("子轩", "浩宇", "宇航", "俊熙", "皓轩", "梓豪", "睿", "泽宇", "一鸣", "博文", "天佑", "晨阳"),
    ("梓涵", "欣怡", "诗涵", "雨桐", "子涵", "可馨", "一诺", "佳怡", "思琪", "雨萱", "若汐", "悦"),
)
FIRMS = "华信 恒通 瑞丰 嘉禾 鑫源 宏达 永安 泰和 明德 金盛 立新 众联".split()  # noqa: SIM905
TRADES = "机械制造 商贸 建筑工程 电子科技 物流 食品 纺织 物业服务 汽车销售".split()  # noqa: SIM905
PUBLIC_UNITS = "人民医院 第一中学 实验小学 市场监督管理局 自然资源局 供销合作社".split()  # noqa: SIM905
